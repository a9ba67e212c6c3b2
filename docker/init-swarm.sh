#!/bin/sh
# One-shot set-up for compose.yaml: a swarm key and the bootstrap node's identity, kept in the shared
# volume, and the multiaddr every other node joins through. Safe to run again: existing files are kept.
set -eu
cd /shared
[ -f swarm.key ] || swarm-node keygen swarm.key
if [ ! -f bootstrap.id ]; then
    python -c "from hivemind.p2p import P2P; P2P.generate_identity('bootstrap.id')"
fi
peer=$(python -c "from hivemind.p2p import PeerID; print(PeerID.from_identity(open('bootstrap.id','rb').read()))")
echo "/ip4/${BOOTSTRAP_IP}/tcp/31337/p2p/${peer}" > bootstrap.maddr
echo "init-swarm: join with --initial-peers $(cat bootstrap.maddr)"
