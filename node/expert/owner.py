"""Whose signed catalogue a node trusts (docs/trust.md, "The expert catalogue").

The catalogue belongs to the node that started the swarm: its entries sit under that node's owner subkey and
only its identity can sign them. A node learns the owner, in order, from `--catalogue-owner`, from having
started the swarm itself, or from the peer it joined through (the `/p2p/` part of its first `--initial-peers`
address, which the operator chose): that peer's signed `_owner` note if it wrote one, else that peer itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def introducer_of(initial_peers: Sequence[str]) -> str:
    """The peer id in the first initial peer's multiaddr ("" without one)."""
    if not initial_peers or "/p2p/" not in initial_peers[0]:
        return ""
    return initial_peers[0].rsplit("/p2p/", 1)[1].strip("/")


@dataclass(frozen=True)
class CatalogueOwner:
    named: str = ""  # --catalogue-owner, or this node's own peer id when it started the swarm
    introducer: str = ""  # the peer this node joined through

    def resolve(self, vouches: Mapping[str, str]) -> str:
        """The owner's peer id, given the `_owner` notes read (by the peer that signed each); "" if unknown."""
        if self.named:
            return self.named
        return vouches.get(self.introducer, self.introducer)

    @classmethod
    def for_node(cls, configured: str, own_peer_id: str, new_swarm: bool,
                 initial_peers: Sequence[str]) -> "CatalogueOwner":
        return cls(named=configured or (own_peer_id if new_swarm else ""), introducer=introducer_of(initial_peers))
