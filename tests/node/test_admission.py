"""What may enter a node: tensors of the swarm's dtype and shapes, and hops along the round's plan."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
import torch

from node.config import DataPlaneConfig
from node.host.metrics import NodeMetrics
from node.stage.activations import Saved
from node.stage.admission import HopAdmission, check_final, check_gradient, check_hidden
from node.stage.executor import StageExecutor
from protocol.envelope import HopSpec, make_envelope
from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.records import PlannedMicrobatch, Reach, RoundPlan

CONFIG = SimpleNamespace(hidden_size=8, max_position_embeddings=16)


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ProtocolError) as e:
        call()
    return e.value.code, e.value.reason


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_activations_must_have_the_swarms_dtype_and_shape():
    check_hidden(torch.zeros(2, 16, 8), torch.float32, CONFIG)  # accepted
    cases = [(torch.zeros(2, 4, 8, dtype=torch.float16), "activations are float16; this swarm computes in float32"),
             (torch.zeros(2, 4), "activations of shape [2, 4]; expected [batch, seq, 8]"),
             (torch.zeros(2, 4, 7), "activations of shape [2, 4, 7]; expected [batch, seq, 8]"),
             (torch.zeros(1, 17, 8), "sequence of 17 tokens exceeds the model's 16")]
    for tensor, reason in cases:
        assert refused(lambda: check_hidden(tensor, torch.float32, CONFIG)) == (INVALID, reason)


def test_a_final_hop_needs_the_origins_labels_of_its_shape():
    env = make_envelope("s", 3, 5, [HopSpec(0, "o", "o:1"), HopSpec(1, "a", "a:1"), HopSpec(0, "o", "o:1")], hop=2)
    hidden = torch.zeros(2, 4, 8)
    check_final(env, hidden, torch.zeros(2, 4, dtype=torch.long))
    assert refused(lambda: check_final(env, hidden, None)) == (
        grpc.StatusCode.NOT_FOUND, "round 3 microbatch 5 did not start at this origin")
    assert refused(lambda: check_final(env, hidden, torch.zeros(2, 5, dtype=torch.long))) == (
        INVALID, "activations of shape [2, 4, 8] do not match this microbatch's labels [2, 5]")


def test_a_gradient_must_match_the_kept_output():
    outputs = torch.zeros(2, 4, 8)
    check_gradient(torch.ones(2, 4, 8), outputs)
    assert refused(lambda: check_gradient(torch.ones(2, 3, 8), outputs)) == (
        INVALID, "gradient of shape [2, 3, 8] float32 does not match the output [2, 4, 8] float32")
    assert refused(lambda: check_gradient(torch.ones(2, 4, 8, dtype=torch.bfloat16), outputs)) == (
        INVALID, "gradient of shape [2, 4, 8] bfloat16 does not match the output [2, 4, 8] float32")


def test_the_executor_refuses_with_these_checks_before_taking_a_slot():
    stage = SimpleNamespace(config=CONFIG)
    ex = StageExecutor("me", {1: stage}, torch.device("cpu"), torch.float32, memory_slots=2, metrics=NodeMetrics(),
                       send=lambda *a: None, recheck_s=0.25, compute_smoothing=0.2, join_timeout=5.0)
    ex.begin_round(0, {(0, 1)})
    path = [HopSpec(0, "o", "o:1"), HopSpec(1, "me", "me:1"), HopSpec(0, "o", "o:1")]
    env = make_envelope("s", 0, 0, path, hop=1)
    assert refused(lambda: ex.accept_forward(env, torch.zeros(1, 4, 8, dtype=torch.float16)))[1] == \
        "activations are float16; this swarm computes in float32"
    assert ex.store.microbatches_held() == 0
    kept = torch.zeros(1, 4, 8)
    assert ex.store.try_reserve(0, 0)
    ex.store.put((0, 0, 0, 1), Saved(1, kept, kept, env))
    assert refused(lambda: ex.accept_backward(env, torch.zeros(1, 3, 8))) == (
        INVALID, "gradient of shape [1, 3, 8] float32 does not match the output [1, 4, 8] float32")
    assert not ex.ledger.backward_claimed((0, 0, 0, 1))


# ---- the plan ---------------------------------------------------------------------------------------------------
ORIGIN, A, B, C = (HopSpec(0, "origin-peer-0001", "o:1"), HopSpec(1, "a-peer-00000001", "a:1"),
                   HopSpec(2, "b-peer-00000002", "b:1"), HopSpec(1, "c-peer-00000003", "c:1"))
PLAN = RoundPlan(round=4, planner=ORIGIN.peer_id, membership_digest="d",
                 microbatches=(PlannedMicrobatch(0, (ORIGIN, A, B, ORIGIN)),))


class FakeDirectory:
    def __init__(self, plans: dict[int, RoundPlan], members: dict[str, str]):
        self.plans = plans
        self.member_endpoints = members
        self.relayed: set[str] = set()
        self.plan_lookups: list[int] = []
        self.member_reads = 0

    def fetch_plan(self, round_: int):
        self.plan_lookups.append(round_)
        return self.plans.get(round_)

    def members(self):
        self.member_reads += 1
        return {p: SimpleNamespace(endpoint=e, reach=Reach.RELAYED if p in self.relayed else Reach.DIRECT)
                for p, e in self.member_endpoints.items()}


def hop(path, round_=4, mb=0, index=1):
    return make_envelope("s", round_, mb, path, hop=index)


def test_the_plans_path_is_admitted_and_unknown_microbatches_are_not():
    directory = FakeDirectory({4: PLAN}, members={})
    admission = HopAdmission(directory, DataPlaneConfig())
    admission.check(hop((ORIGIN, A, B, ORIGIN)))  # the plan's own path: no member lookup needed
    admission.check(hop((ORIGIN, A, B, ORIGIN), index=2))
    assert directory.plan_lookups == [4]  # looked up once, then kept
    assert refused(lambda: admission.check(hop((ORIGIN, A, B, ORIGIN), mb=9))) == (
        grpc.StatusCode.NOT_FOUND, "microbatch 9 from eer-0001 is not in round 4's plan")
    stranger = HopSpec(0, "someone-else-01", "z:1")
    assert refused(lambda: admission.check(hop((stranger, A, B, stranger)))) == (
        grpc.StatusCode.NOT_FOUND, "microbatch 0 from -else-01 is not in round 4's plan")


def test_a_rerouted_path_must_go_through_verified_members_at_their_addresses():
    directory = FakeDirectory({4: PLAN}, members={ORIGIN.peer_id: "o:1", C.peer_id: "c:1", B.peer_id: "b:1"})
    admission = HopAdmission(directory, DataPlaneConfig())
    admission.check(hop((ORIGIN, C, B, ORIGIN)))  # around A, through members
    moved = HopSpec(1, C.peer_id, "evil:1")
    assert refused(lambda: admission.check(hop((ORIGIN, moved, B, ORIGIN)))) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "path goes through evil:1 (00000003), which is not a verified member of the swarm at that address")
    assert refused(lambda: admission.check(hop((ORIGIN, A, C, ORIGIN)))) == (  # A is not a member
        grpc.StatusCode.PERMISSION_DENIED,
        "path goes through a:1 (00000001), which is not a verified member of the swarm at that address")


def test_a_member_that_moved_is_read_again_and_a_relayed_one_is_taken_at_any_endpoint():
    directory = FakeDirectory({4: PLAN}, members={ORIGIN.peer_id: "o:1", C.peer_id: "c:1", B.peer_id: "b:1"})
    admission = HopAdmission(directory, DataPlaneConfig(members_refresh=3600, plan_lookup_retry=0))
    admission.check(hop((ORIGIN, C, B, ORIGIN)))
    reads = directory.member_reads
    directory.member_endpoints[C.peer_id] = "c:2"  # C announced another endpoint since our last read
    admission.check(hop((ORIGIN, HopSpec(1, C.peer_id, "c:2"), B, ORIGIN)))
    assert directory.member_reads == reads + 1
    # A relayed member's endpoint moves with its relay, and a re-routed path may name one it left: senders dial
    # the endpoint its record announces, so its peer id is what admission checks.
    directory.relayed.add(C.peer_id)
    admission.check(hop((ORIGIN, HopSpec(1, C.peer_id, "relay:40001"), B, ORIGIN)))
    assert refused(lambda: admission.check(hop((ORIGIN, HopSpec(1, C.peer_id, "relay:40001"),
                                                HopSpec(2, B.peer_id, "evil:1"), ORIGIN))))[0] == \
        grpc.StatusCode.PERMISSION_DENIED  # a direct member still only at its own endpoint


def test_a_missing_plan_is_retried_no_more_often_than_configured():
    directory = FakeDirectory({}, members={})
    admission = HopAdmission(directory, DataPlaneConfig(plan_lookup_retry=3600))
    for _ in range(3):
        assert refused(lambda: admission.check(hop((ORIGIN, A, B, ORIGIN)))) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, "this node has no plan for round 4 yet; retry shortly")
    assert directory.plan_lookups == [4]
    eager = HopAdmission(directory, DataPlaneConfig(plan_lookup_retry=0))
    directory.plans[4] = PLAN
    with pytest.raises(ProtocolError):
        eager.check(hop((ORIGIN, A, B, ORIGIN), mb=9))
    eager.check(hop((ORIGIN, A, B, ORIGIN)))
    assert directory.plan_lookups == [4, 4]


def test_only_the_newest_plans_are_kept():
    plans = {r: RoundPlan(round=r, planner=ORIGIN.peer_id, membership_digest="d",
                          microbatches=(PlannedMicrobatch(0, (ORIGIN, A, B, ORIGIN)),)) for r in range(5)}
    directory = FakeDirectory(plans, members={})
    admission = HopAdmission(directory, DataPlaneConfig(plans_kept=2))
    for r in range(5):
        admission.check(hop((ORIGIN, A, B, ORIGIN), round_=r))
    directory.plan_lookups.clear()
    admission.check(hop((ORIGIN, A, B, ORIGIN), round_=4))
    admission.check(hop((ORIGIN, A, B, ORIGIN), round_=3))
    assert directory.plan_lookups == []  # the two newest are still held
    admission.check(hop((ORIGIN, A, B, ORIGIN), round_=0))
    assert directory.plan_lookups == [0]  # an older one was let go and is looked up again


def test_only_the_origin_reroutes_and_only_an_origin_says_it_is_done():
    admission = HopAdmission(FakeDirectory({4: PLAN}, members={}), DataPlaneConfig())
    notice = pb.RerouteNotice(swarm_id="s", round=4, microbatch=0, attempt=5)
    admission.check_reroute(notice, ORIGIN.peer_id)
    assert refused(lambda: admission.check_reroute(notice, A.peer_id)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "Reroute of round 4 microbatch 0 from 00000001: only its origin eer-0001 re-routes it")
    assert refused(lambda: admission.check_reroute(pb.RerouteNotice(round=4, microbatch=9), ORIGIN.peer_id)) == (
        grpc.StatusCode.NOT_FOUND, "Reroute: microbatch 9 is not in round 4's plan")
    done = pb.RoundDoneNotice(swarm_id="s", round=4, origin=ORIGIN.peer_id)
    admission.check_round_done(done, ORIGIN.peer_id)
    admission.check_round_done(pb.RoundDoneNotice(round=7, origin=ORIGIN.peer_id), ORIGIN.peer_id)  # no plan needed
    assert refused(lambda: admission.check_round_done(done, A.peer_id)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "RoundDone for eer-0001 in round 4 from 00000001: an origin says only for itself that it is done")


def test_a_plan_the_round_loop_fetched_needs_no_lookup():
    directory = FakeDirectory({}, members={})
    admission = HopAdmission(directory, DataPlaneConfig(plans_kept=2))
    admission.know(PLAN)
    admission.check(hop((ORIGIN, A, B, ORIGIN)))
    admission.check_reroute(pb.RerouteNotice(round=4, microbatch=0, attempt=1), ORIGIN.peer_id)
    assert directory.plan_lookups == []
