"""Which incoming hops may take an activation slot: those the round's signed plan has, along verified members.

Checked by the servicer after the envelope's structure and before the executor reserves memory, so a
client that invents microbatches, or paths through addresses of its choosing, costs a dictionary lookup.
A path that differs from the plan's (a re-route) is accepted only if every hop is a verified member
at the endpoint it announced.
"""

from __future__ import annotations

import threading
import time

import grpc

from node.control.discovery import SwarmDirectory
from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.envelope import HopSpec
from protocol.records import RoundPlan

PLAN_RETRY_S = 0.5  # a round whose plan we lack is looked up in the DHT at most this often
MEMBERS_REFRESH_S = 2.0
PLANS_KEPT = 4


class HopAdmission:
    def __init__(self, directory: SwarmDirectory):
        self.directory = directory
        self._plans: dict[int, RoundPlan] = {}
        self._looked_up: dict[int, float] = {}
        self._members: dict[str, str] = {}  # verified peer id -> endpoint
        self._members_at = float("-inf")
        self._lock = threading.Lock()

    def check(self, env: pb.Envelope) -> None:
        plan = self._plan(env.round)
        if plan is None:  # the plan may still be on its way through the DHT: the sender retries
            raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this node has no plan for round {env.round} yet; retry shortly")
        planned = next((mb for mb in plan.microbatches if mb.id == env.microbatch), None)
        if planned is None or planned.origin != env.path[0].peer_id:
            raise ProtocolError(grpc.StatusCode.NOT_FOUND,
                                f"microbatch {env.microbatch} from {env.path[0].peer_id[-8:]} is not in round "
                                f"{env.round}'s plan")
        path = tuple(HopSpec(h.stage, h.peer_id, h.endpoint) for h in env.path)
        if path == planned.path:
            return
        members = self._verified_members()
        for hop in path:
            if members.get(hop.peer_id) != hop.endpoint:
                raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                                    f"path goes through {hop.endpoint} ({hop.peer_id[-8:]}), which is not a "
                                    f"verified member of the swarm at that address")

    def _plan(self, round_: int) -> RoundPlan | None:
        with self._lock:
            plan = self._plans.get(round_)
            if plan is not None or time.monotonic() - self._looked_up.get(round_, float("-inf")) < PLAN_RETRY_S:
                return plan
            self._looked_up[round_] = time.monotonic()
        plan = self.directory.fetch_plan(round_)
        with self._lock:
            if plan is not None:
                self._plans[round_] = plan
                for old in sorted(self._plans)[:-PLANS_KEPT]:
                    del self._plans[old]
            for old in [r for r in self._looked_up if r < round_ - PLANS_KEPT]:
                del self._looked_up[old]
        return plan

    def _verified_members(self) -> dict[str, str]:
        with self._lock:
            if time.monotonic() - self._members_at < MEMBERS_REFRESH_S:
                return self._members
        members = {p: r.endpoint for p, r in self.directory.members().items()}
        with self._lock:
            self._members, self._members_at = members, time.monotonic()
        return members
