import grpc
import pytest

from protocol.envelope import HopSpec, at_hop, check_envelope, is_final_hop, make_envelope
from protocol.errors import ProtocolError
from protocol.limits import WireLimits

ORIGIN = HopSpec(0, "origin", "h:1")


def check(env, peer="p2", stages=(2,), num_stages=4):
    check_envelope(env, swarm_id="s", peer_id=peer, stages=list(stages), num_stages=num_stages,
                   limits=WireLimits())


def test_skipping_and_swapping_paths_are_valid():
    # Stage 1 skipped and stages 3, 2 swapped: the wire accepts any order, each stage at most once.
    path = [ORIGIN, HopSpec(3, "p3", "h:3"), HopSpec(2, "p2", "h:2"), ORIGIN]
    env = make_envelope("s", 0, 0, path, 2)
    check(env)
    assert at_hop(env, 3).hop == 3 and is_final_hop(at_hop(env, 3)) and env.hop == 2


@pytest.mark.parametrize("path, hop, message", [
    ([ORIGIN], 0, "origin first and last"),
    ([ORIGIN, HopSpec(2, "p2", "h:2"), HopSpec(0, "other", "h:9")], 1, "same stage-0 origin"),
    ([ORIGIN, HopSpec(2, "p2", "h:2"), HopSpec(2, "p9", "h:9"), ORIGIN], 1, "twice"),
    ([ORIGIN, HopSpec(7, "p2", "h:2"), ORIGIN], 1, "outside"),
    ([ORIGIN, HopSpec(2, "p2", "h:2"), ORIGIN], 5, "outside the path"),
    ([ORIGIN, HopSpec(2, "someone", "h:2"), ORIGIN], 1, "not to this node"),
    ([ORIGIN, HopSpec(3, "p2", "h:2"), ORIGIN], 1, "does not host"),
    ([ORIGIN, HopSpec(2, "p2", ""), ORIGIN], 1, "endpoint"),
])
def test_bad_paths_are_refused_with_a_reason(path, hop, message):
    with pytest.raises(ProtocolError, match=message) as e:
        check(make_envelope("s", 0, 0, path, hop))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_wrong_swarm_is_permission_denied():
    env = make_envelope("other-swarm", 0, 0, [ORIGIN, HopSpec(2, "p2", "h:2"), ORIGIN], 1)
    with pytest.raises(ProtocolError) as e:
        check(env)
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
