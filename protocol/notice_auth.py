"""Control messages bound to their sender, in every swarm, public ones included.

A `FailureReport`, `RerouteNotice` or `RoundDoneNotice` carries a `SenderProof`: the sender's libp2p
public key and its RSA signature over the method, the receiver's peer id and the message with the proof
left out. The receiver derives the sender's peer id from the key (as for owned DHT records,
protocol/record_auth.py) and then decides, from the round's signed plan, whether that peer may send this
message (node/stage/admission.py, node/faults/faults.py). The swarm key proves only membership; this
proves which member.

Naming the receiver means a signed notice cannot be re-sent to another node. A notice re-sent to its own
receiver changes nothing: re-routes, round ends and reports about attempts already replaced are idempotent.
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from protocol.errors import ProtocolError
from protocol.record_auth import peer_id_of_key

_DOMAIN = b"swarm-node notice v1"

Notice = TypeVar("Notice")  # a FailureReport, RerouteNotice or RoundDoneNotice


def _payload(method: str, message, receiver: str) -> bytes:
    bare = type(message)()
    bare.CopyFrom(message)
    bare.ClearField("sender")
    parts = (_DOMAIN, method.encode(), receiver.encode(), bare.SerializeToString(deterministic=True))
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


class NoticeSigner:
    """Signs this node's control messages with its identity key."""

    def __init__(self, private_key: RSAPrivateKey):
        self._key = private_key
        self.public_key = private_key.get_public_key().to_bytes()

    def sign(self, method: str, message: Notice, receiver: str) -> Notice:
        """A copy of `message` with a proof for `method` sent to `receiver` (a peer id)."""
        signed = type(message)()
        signed.CopyFrom(message)
        signed.sender.public_key = self.public_key
        signed.sender.signature = self._key.sign(_payload(method, message, receiver))
        return signed


def verified_sender(method: str, message, receiver: str) -> str:
    """The peer id that signed `message` for `method` to `receiver`; PERMISSION_DENIED with a reason otherwise."""
    if not message.HasField("sender") or not message.sender.public_key:
        raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED, f"{method} carries no sender proof")
    peer = peer_id_of_key(message.sender.public_key)
    if peer is None:
        raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED, f"{method}: the sender's key is not an RSA key")
    try:
        ok = RSAPublicKey.from_bytes(message.sender.public_key).verify(_payload(method, message, receiver),
                                                                      message.sender.signature)
    except Exception:  # a malformed key or signature
        ok = False
    if not ok:
        raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                            f"{method}: the signature of {peer[-8:]} does not verify for this receiver")
    return peer
