"""Stopping and dying on real swarms: a signal in any phase exits 0 within 5 s leaving nothing behind, a
`kill -9` leaves no orphans, hostile frames get a status with a reason, and metrics tell the truth.

Swarm "lifecycle": D0 and D1 (stage 0, data nodes: every plan has both, so they average every round)
and S1 (stage 1); D3 joins late. Freezing the DHT process (SIGSTOP) of the data node that does not plan
holds each node in one phase long enough to stop it there: that node in planning (it cannot read the
next plan, but answers pings, so plans keep it and its microbatches never start); the planner in
averaging after each round's deadline (it waits for the frozen replica's gradients until its grace period
ends); S1 in planning once the planner is gone; D3 in catch-up (it waits for the state after a round
that cannot finish in time).
Swarm "lonely": PL (stage 0), started from a shell as an operator does, and Q (stage 1). Freezing Q
holds PL in compute; then the shell's process group gets SIGINT, as a terminal's Ctrl-C sends it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.events import read_events
from node.process.local_swarm import LocalSwarm, tail
from protocol.envelope import HopSpec, make_envelope
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.limits import WireLimits
from protocol.service import SERVICE, StageStub
from protocol.tensor_frames import encode_frames
from tests.helpers import REPO, alive, descendants, node, sample, scrape, wait_for

pytestmark = pytest.mark.slow

SWARM = "lifecycle"
HIDDEN = 64  # the tiny preset
STOP_S = 5.0  # the bound for a stop, and for a killed node's children to go
COMMON = ["--num-stages", "2", "--torch-threads", "1", "--device", "cpu", "--microbatches", "2",
          "--round-timeout", "300", "--heartbeat-interval", "1", "--record-ttl", "30", "--log-level", "info"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lifecycle")
    # A short round timeout: with a frozen origin, each round lasts until its deadline.
    swarm = LocalSwarm(workdir, SWARM, common_args=COMMON + ["--round-timeout", "20"])
    lonely = LocalSwarm(workdir, "lonely", common_args=COMMON)
    shell = _start_from_shell(workdir)
    first = swarm.start_node("d0", "0")
    swarm.wait_started([first], timeout=120)
    shell_node = wait_for(lambda: _started(workdir / "pl.events.jsonl"), 120, "the shell's node to start")
    rest = [swarm.start_node(name, stage, initial_peers=swarm.initial_peers()) for name, stage in
            (("d1", "0"), ("s1", "1"))]
    rest.append(lonely.start_node("q", "1", initial_peers=shell_node["maddrs"][:1]))
    swarm.wait_started(rest, timeout=180)
    swarm.shell, swarm.lonely = shell, lonely
    yield swarm
    for pid in [shell.pid] + [n.process.pid for n in swarm.nodes + lonely.nodes]:
        for p in descendants(pid):  # a test that failed half-way may have left one frozen
            _signal(p, signal.SIGCONT)
    if shell.poll() is None:
        os.killpg(shell.pid, signal.SIGKILL)
    swarm.stop()
    lonely.stop()


def _start_from_shell(workdir) -> subprocess.Popen:
    """`swarm-node run` as a terminal's foreground job: the shell and the node share one process group."""
    node = (f"{sys.executable} -m node run --new-swarm --swarm lonely --stages 0 "
            f"--events-file {workdir}/pl.events.jsonl {' '.join(COMMON)} --microbatches 16")  # rounds mostly compute
    script = f"{node}; echo \"node exited $?\""
    # The new session stands in for the terminal; inside it, nothing starts a session or a group of its own.
    return subprocess.Popen(["bash", "-c", script], cwd=REPO, stdout=open(workdir / "pl.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _started(events_path) -> dict | None:
    started = [e for e in read_events(events_path) if e["event"] == "started"]
    return started[0] if started else None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def phase_of(metrics_url: str) -> str | None:
    for name, value in scrape(metrics_url).items():
        found = re.fullmatch(r'swarm_node_phase\{swarm_node_phase="(\w+)"\}', name)
        if found and value == 1.0:
            return found.group(1)
    return None


def stop_in_phase(process: subprocess.Popen, metrics_url: str, phase: str, send, log) -> float:
    """Wait until the node is in `phase`, stop it with `send()`; it must exit 0 and every child process it
    started must be gone within 5 s. Returns the seconds that took. `log`: the node's log, shown on failure."""
    wait_for(lambda: phase_of(metrics_url) == phase, 120, f"the node to be in phase {phase}")
    children = descendants(process.pid)
    assert children, "a running node has its DHT process and p2pd below it"
    started = time.monotonic()
    send()
    try:
        code = process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:  # the node writes its threads' stacks to its log after --stuck-stop-dump
        time.sleep(2.0)
        pytest.fail(f"no exit {STOP_S} s after the signal; the node's log ends:\n{tail(log, 120)}")
    assert code == 0, tail(log, 120)
    wait_for(lambda: not [p for p in children if alive(p)], max(0.1, started + STOP_S - time.monotonic()),
             "every child process of the stopped node to exit")
    return time.monotonic() - started


# ---- while the swarm trains -----------------------------------------------------------------------------------
def test_metrics_count_rounds_and_loss_only_where_computed(swarm):
    d0, s1 = node(swarm, "d0"), node(swarm, "s1")
    first = wait_for(lambda: sample(d0, "swarm_node_rounds_completed_total"), 120, "a completed round on d0")
    wait_for(lambda: sample(d0, "swarm_node_rounds_completed_total") > first, 120, "another completed round")
    assert sample(d0, "swarm_node_rounds_aborted_total") == 0
    assert 0 < sample(d0, "swarm_node_loss") < 10
    wait_for(lambda: sample(s1, "swarm_node_rounds_completed_total"), 120, "a completed round on s1")
    samples = scrape(s1.started()["metrics_url"])
    assert "swarm_node_loss" not in samples  # stage 1 computes no loss: no series at all, not a 0
    assert samples['swarm_node_state{swarm_node_state="serving"}'] == 1.0


def _raw_stub(channel: grpc.Channel, method: str, streaming: bool):
    path = f"/{SERVICE}/{method}"
    if method == "FetchState":
        return channel.unary_stream(path, request_serializer=None, response_deserializer=None)
    return (channel.stream_unary if streaming else channel.unary_unary)(path, request_serializer=None,
                                                                          response_deserializer=None)


def _valid_forward(swarm, target) -> bytes:
    """A well-formed Forward for the target's stage, to mutate."""
    data = node(swarm, "d0").started()
    origin = HopSpec(0, data["peer_id"], data["endpoint"])
    me = HopSpec(1, target.started()["peer_id"], target.started()["endpoint"])
    env = make_envelope(SWARM, 10 ** 6, 0, [origin, me, origin], 1)
    return b"".join(encode_frames(env, torch.zeros(2, 8, HIDDEN), WireLimits()))


def test_fuzzed_frames_get_a_status_with_a_reason_and_the_node_keeps_serving(swarm):
    target = node(swarm, "s1")
    channel = grpc.insecure_channel(target.started()["endpoint"])
    valid = _valid_forward(swarm, target)
    errors_before = sum(v for k, v in scrape(target.started()["metrics_url"]).items()
                        if k.startswith("swarm_node_rpc_errors_total"))
    refused = 0

    frames = st.one_of(
        st.binary(max_size=256),
        st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=8)).map(
            lambda m: valid[:m[0]] + m[1] + valid[m[0] + len(m[1]):]),  # overwrite a few bytes of a good frame
        st.integers(1, len(valid) - 1).map(lambda n: valid[:n]),  # truncated
    )

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(method=st.sampled_from(["Forward", "Backward", "FetchState", "Ping", "Info"]),
           payload=st.lists(frames, min_size=1, max_size=3))
    def check(method, payload):
        nonlocal refused
        streaming = method in ("Forward", "Backward")
        call = _raw_stub(channel, method, streaming)
        try:
            if method == "FetchState":
                list(call(payload[0], timeout=10))
            elif streaming:
                call(iter(payload), timeout=10)
            else:
                call(payload[0], timeout=10)
        except grpc.RpcError as e:
            assert e.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED), (method, e.code(), e.details())
            assert e.details(), (method, e.code())
            refused += 1

    check()
    # One message over the size limit: refused by the node's own check, with a reason (gRPC's cap is twice it).
    with pytest.raises(grpc.RpcError) as e:
        _raw_stub(channel, "Forward", True)(iter([b"\0" * (WireLimits().max_message_bytes + 1)]), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "message limit" in e.value.details()
    refused += 1

    # Still serving: it answers, and counted every refusal.
    stub = StageStub(channel)
    assert stub.Ping(pb.PingRequest(), timeout=5).peer_id == target.started()["peer_id"]
    assert stub.Info(pb.InfoRequest(), timeout=5).stages == [1]
    assert refused > 100
    errors = wait_for(lambda: (lambda n: n if n >= errors_before + refused else None)(
        sum(v for k, v in scrape(target.started()["metrics_url"]).items()
            if k.startswith("swarm_node_rpc_errors_total"))), 10, "every refusal in rpc_errors_total")
    assert errors >= errors_before + refused
    # The swarm still trains through it.
    d0 = node(swarm, "d0")
    done = sample(d0, "swarm_node_rounds_completed_total")
    wait_for(lambda: sample(d0, "swarm_node_rounds_completed_total") > done, 120, "a round after the fuzzing")


def test_heartbeat_age_grows_while_the_dht_process_is_frozen(swarm):
    s1 = node(swarm, "s1")
    dht = _dht_process(s1.process.pid)
    os.kill(dht, signal.SIGSTOP)
    try:
        wait_for(lambda: sample(s1, "swarm_node_dht_heartbeat_age_seconds") > 4, 30, "a growing heartbeat age")
    finally:
        os.kill(dht, signal.SIGCONT)
    wait_for(lambda: sample(s1, "swarm_node_dht_heartbeat_age_seconds") < 3, 30, "a fresh heartbeat again")


def _python_children(pid: int) -> list[int]:
    return [p for p in descendants(pid) if _ppid(p) == pid and "python" in _cmdline(p)]


def _dht_process(pid: int) -> int:
    """The node's DHT process: the child that runs p2pd."""
    found = [p for p in _python_children(pid) if any("p2pd" in _cmdline(c) for c in descendants(p))]
    assert len(found) == 1, found
    return found[0]


def _ppid(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---- stopping in each phase ---------------------------------------------------------------------------------
def test_ctrl_c_from_a_terminal_stops_a_node_in_compute_and_kill_9_leaves_no_orphans(swarm):
    shell = swarm.shell
    url = _started(swarm.workdir / "pl.events.jsonl")["metrics_url"]
    node_pid = next(p for p in descendants(shell.pid) if _ppid(p) == shell.pid)
    assert not _sigint_ignored(node_pid)
    q = swarm.lonely.nodes[0]
    wait_for(lambda: sample(q, "swarm_node_rounds_completed_total"), 120, "a round in the lonely swarm")
    wait_for(lambda: phase_of(url) == "compute", 60, "PL in compute")
    os.kill(q.process.pid, signal.SIGSTOP)  # the round's remaining hops wait at q: PL stays in compute
    # Ctrl-C: SIGINT to the terminal's foreground process group, the shell and the node.
    stop_in_phase(shell, url, "compute", lambda: os.killpg(shell.pid, signal.SIGINT), swarm.workdir / "pl.log")
    assert "node exited 0" in (swarm.workdir / "pl.log").read_text()

    # kill -9 of the frozen q (its DHT process is not frozen): within 5 s nothing it started is still running.
    children = descendants(q.process.pid)
    assert len(children) >= 2  # DHT process, p2pd
    q.process.kill()
    q.process.wait()
    wait_for(lambda: not [p for p in children if alive(p)], STOP_S, "the killed node's children to exit")


def _sigint_ignored(pid: int) -> bool:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


# The frozen DHT process hangs the node's DHT reads: they give up after --dht-read-timeout (or at once on
# stop), so the node still reaches planning, and stops there within the bound.
def test_stop_in_averaging_planning_and_catch_up(swarm):
    d0, d1, s1 = node(swarm, "d0"), node(swarm, "d1"), node(swarm, "s1")
    planner, frozen = sorted((d0, d1), key=lambda n: n.started()["peer_id"])  # the lowest data node plans
    dht = _dht_process(frozen.process.pid)
    os.kill(dht, signal.SIGSTOP)
    wait_for(lambda: phase_of(frozen.started()["metrics_url"]) == "planning", 120, f"{frozen.name} in planning")
    # A late data node: not in the round's plan, it waits to copy the state after the round from d0 or d1.
    d3 = swarm.start_node("d3", "0", initial_peers=planner.started()["maddrs"][:1])  # not the frozen DHT
    swarm.wait_started([d3], timeout=180)

    stop_in_phase(d3.process, d3.started()["metrics_url"], "catch_up", lambda: d3.process.send_signal(signal.SIGINT),
                  d3.log_path)
    stop_in_phase(planner.process, planner.started()["metrics_url"], "averaging",
                  lambda: planner.process.send_signal(signal.SIGINT), planner.log_path)
    # Nobody is left to plan the next round.
    stop_in_phase(s1.process, s1.started()["metrics_url"], "planning", lambda: s1.process.send_signal(signal.SIGTERM),
                  s1.log_path)
    stop_in_phase(frozen.process, frozen.started()["metrics_url"], "planning",
                  lambda: (frozen.process.send_signal(signal.SIGTERM), os.kill(dht, signal.SIGCONT)), frozen.log_path)
