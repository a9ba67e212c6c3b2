"""Activation transfer over the gRPC data plane, public and private, side by side with raw TCP and hivemind's p2p.

    python bench/bench_transport.py                  # the headline run; writes bench/results/transport.md
    python bench/bench_transport.py --variant NAME   # adds a column "grpc:NAME": the same protocol/ code with
                                                     # another chunk size (chunk-1m, chunk-4m; repeatable);
                                                     # writes bench/results/transport_variants.md

Every transport moves the same float32 tensor from a client process to a server process on loopback and
is timed from the start of encoding on the sender to the receipt of the receiver's acknowledgement, sent
only after the tensor is fully decoded on the far side:

* grpc   - a sync ``grpc.server`` with StageService registered through ``protocol.service.stage_service_handler``,
           whose Forward does what node/dataplane/servicer.py does on receipt (``decode_frames`` into a tensor, then
           ``Ack``; no executor); the client calls ``StageStub(channel).Forward(encode_frames(...))`` as
           node/dataplane/transport.py does. Always the real ``channel_options`` / ``server_options`` / ``WireLimits()``;
           variants run as separate, labelled "grpc:NAME" columns and never alter the "grpc" column.
* grpc+auth - the same, in a private swarm: the client dials with ``node.dataplane.transport.dial`` and tags each
           Forward with ``SwarmAuth.sign_frames`` (as ``StageClients.frame_signer``); the server runs
           ``ServerAuthInterceptor`` and checks the frames with ``SwarmAuth.check_frames`` as it decodes them, as
           node/dataplane/servicer.py does.
* grpc+tls  - grpc+auth over TLS with the certificate derived from the swarm key (``--swarm-key`` and ``--tls``).
* tcp    - length-prefixed ``sendall`` of the tensor's bytes; the receiver ``recv_into``s a preallocated
           bytearray and answers one byte. The ceiling for anything on loopback.
* p2p    - two ``hivemind.p2p.P2P`` instances, each with its own p2pd; a ``stream_input`` protobuf handler
           fed the way hivemind's RemoteExpert / Petals feed it (``serialize_torch_tensor`` with
           ``CompressionType.NONE``, ``split_for_streaming`` at hivemind's ``DEFAULT_MAX_MSG_SIZE``, one
           ``ExpertRequest`` per part, built in an executor) and drained the way ``ConnectionHandler`` drains
           it (``deserialize_tensor_stream`` = ``combine_from_streaming`` + ``deserialize_torch_tensor``).

Repeats are interleaved (the transport order rotates on every repeat) so that the shared cores' slow
spells hit all transports alike; the table quotes medians and ratios of medians.

Process hygiene: every child runs in its own process group with a watchdog that kills the group if the
parent disappears; the parent stops each group (graceful, then SIGTERM, then SIGKILL) on exit, error or
Ctrl-C, so no server or p2pd outlives a run.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import random
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MiB = 1 << 20
TRANSPORTS = ("grpc", "grpc+auth", "grpc+tls", "tcp", "p2p")
PRIVATE = {"grpc+auth": "auth", "grpc+tls": "tls"}  # private-swarm columns -> how they are secured
RECEIVER = "receiver"  # the receiving peer id the bench's envelopes name (tags are bound to it)
DEFAULT_SIZES_MIB = (1, 16, 64)
DEFAULT_REPEATS = {1: 7, 16: 7, 64: 5}
HIDDEN = 4096  # activations are (tokens, hidden) float32
VERIFY_MICROBATCH = 1  # the envelope / uid / header flag that asks a receiver for a checksum (warm-up only)
TRANSFER_TIMEOUT_S = 60.0
BOOTSTRAP = 2000  # resamples for the confidence interval of a paired ratio
STARTUP_TIMEOUT_S = 180.0  # many children import torch at once on 2 shared cores

# ---------------------------------------------------------------------------------------------------------
# Variants: the one open question left, the chunk size (`WireLimits.chunk_bytes`, protocol/limits.py).
#
# The "grpc" column runs protocol/ exactly as committed: `stage_service_handler` and `StageStub`,
# `encode_frames` / `decode_frames`, `channel_options` / `server_options`, `WireLimits()`. Each
# `--variant NAME` adds a column "grpc:NAME" to the same interleaved run, served by its own server process,
# that runs the same code with `WireLimits(chunk_bytes=...)`: nothing is re-implemented here and nothing in
# protocol/ is patched, so the "grpc" column cannot be contaminated by a variant running next to it.
# ---------------------------------------------------------------------------------------------------------

VARIANTS: dict[str, int] = {"chunk-1m": 1 * MiB, "chunk-4m": 4 * MiB}  # name -> chunk_bytes


def bench_limits(variant: str | None):
    """WireLimits() for the "grpc" column; with the variant's chunk size for "grpc:NAME"."""
    from protocol.limits import WireLimits

    return WireLimits(chunk_bytes=VARIANTS[variant]) if variant else WireLimits()


# ---------------------------------------------------------------------------------------------------------
# Child-process plumbing
# ---------------------------------------------------------------------------------------------------------


def _child_setup() -> None:
    """Own process group (Ctrl-C reaches only the parent, which stops us; killpg reaches our p2pd too) and a
    watchdog that takes the whole group down if the parent dies without cleaning up."""
    os.setpgrp()
    parent = os.getppid()

    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM: leave through the normal exit path so that finally-blocks (p2pd shutdown) run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def _tensor_shape(size_mib: int) -> tuple[int, int]:
    numel = size_mib * MiB // 4
    return numel // HIDDEN, HIDDEN


def _int_checksum(tensor) -> int:
    import torch

    return int(tensor.contiguous().view(torch.int32).to(torch.int64).sum())


def cpu_ns(pids) -> int:
    """CPU time (ns) used so far by all threads of these processes: Linux's per-process CPU clock
    (clock_gettime on MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)), exact even for threads running right now."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += time.clock_gettime_ns(((~pid) << 3) | 2)
    return total


# ----- gRPC server ------------------------------------------------------------------------------------------


def grpc_server_main(conn, variant_name: str | None, security: str | None = None, swarm_key: bytes = b"") -> None:
    """The receiving end of the node's data plane, registered and decoding as node/ does; variant None is
    protocol/ untouched. `security` "auth" checks every call's tag under `swarm_key`; "tls" also serves TLS."""
    _child_setup()
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import torch

    from protocol.generated.swarm.v1 import stage_pb2 as pb
    from protocol.generated.swarm.v1 import stage_pb2_grpc as pb_grpc
    from protocol.grpc_options import server_options
    from protocol.rpc_auth import ServerAuthInterceptor, SwarmAuth
    from protocol.service import SERVICE, stage_service_handler
    from protocol.tensor_frames import decode_frames
    from protocol.tls import SwarmTls

    torch.set_num_threads(1)
    limits = bench_limits(variant_name)
    auth = SwarmAuth(swarm_key) if security else None
    check = (lambda env, meta: auth.check_frames("Forward", env, meta, RECEIVER)) if auth else None

    class Servicer(pb_grpc.StageServiceServicer):
        """node/dataplane/servicer.py's Forward without the node: decode the frames into a tensor, then Ack."""

        def Forward(self, request_iterator, context):
            envelope, tensor = decode_frames(request_iterator, limits, check)
            return pb.Ack(queued=_int_checksum(tensor) if envelope.microbatch == VERIFY_MICROBATCH else 0)

    interceptors = [] if auth is None else [ServerAuthInterceptor(auth, RECEIVER, {f"/{SERVICE}/Forward"}, set(),
                                                                  on_refused=lambda method, reason: None)]
    server = grpc.server(ThreadPoolExecutor(max_workers=16), options=server_options(limits),  # as node/daemon.py
                         interceptors=interceptors)
    server.add_generic_rpc_handlers((stage_service_handler(Servicer()),))
    if security == "tls":
        port = server.add_secure_port("127.0.0.1:0", SwarmTls.derived(swarm_key).server_credentials())
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        conn.send(("ready", (port, [os.getpid()])))
        conn.recv()  # any message, or EOF: stop
    except (EOFError, OSError):
        pass
    finally:
        server.stop(grace=None).wait(5)


# ----- raw TCP server ---------------------------------------------------------------------------------------

TCP_HEADER = struct.Struct("<QB")  # payload length, verify flag


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed mid-message")
        got += n


def tcp_server_main(conn, max_bytes: int) -> None:
    _child_setup()
    import torch

    torch.set_num_threads(1)
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(("ready", (listener.getsockname()[1], [os.getpid()])))
    buf = bytearray(max_bytes)  # preallocated once, large enough for every size in the run
    view = memoryview(buf)
    header = bytearray(TCP_HEADER.size)

    def serve() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:  # the listener was closed: shutting down
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with sock:
                try:
                    while True:
                        _recv_exact_into(sock, memoryview(header))
                        length, verify = TCP_HEADER.unpack(header)
                        _recv_exact_into(sock, view[:length])
                        if verify:
                            checksum = _int_checksum(torch.frombuffer(buf, dtype=torch.float32, count=length // 4))
                            sock.sendall(struct.pack("<q", checksum))
                        else:
                            sock.sendall(b"\x01")
                except OSError:  # the client went away
                    continue

    threading.Thread(target=serve, name="tcp-serve", daemon=True).start()
    with contextlib.suppress(EOFError, OSError):
        conn.recv()
    listener.close()


# ----- hivemind p2p server ----------------------------------------------------------------------------------

P2P_HANDLER = "bench_forward_stream"


def p2p_server_main(conn) -> None:
    _child_setup()
    import asyncio

    import torch
    from hivemind.compression import deserialize_tensor_stream, serialize_torch_tensor
    from hivemind.p2p import P2P
    from hivemind.proto import runtime_pb2
    from hivemind.utils import switch_to_uvloop
    from hivemind.utils.asyncio import amap_in_executor

    torch.set_num_threads(1)  # as hivemind's ConnectionHandler does
    loop = switch_to_uvloop()

    async def forward_stream(requests, context) -> runtime_pb2.ExpertResponse:
        uid = None

        def unpack(req: runtime_pb2.ExpertRequest):
            nonlocal uid
            uid = uid or req.uid
            return req.tensors

        (tensor,) = await deserialize_tensor_stream(amap_in_executor(unpack, requests))
        if uid == "verify":
            checksum = torch.tensor([_int_checksum(tensor)], dtype=torch.int64)
            return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(checksum)])
        return runtime_pb2.ExpertResponse()

    async def run() -> None:
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            await p2p.add_protobuf_handler(P2P_HANDLER, forward_stream, runtime_pb2.ExpertRequest, stream_input=True)
            maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
            conn.send(("ready", ((p2p.peer_id.to_base58(), maddrs), [os.getpid(), p2p._child.pid])))
            stop = asyncio.Event()
            loop.add_reader(conn.fileno(), stop.set)  # any message or EOF on the pipe
            await stop.wait()
        finally:
            await p2p.shutdown()

    with contextlib.suppress(EOFError, OSError, SystemExit):
        loop.run_until_complete(run())


# ----- client -------------------------------------------------------------------------------------------------


def client_main(conn, servers: dict, plan: list[tuple[int, int]], warmup: int, transports: list[str],
                swarm_key: bytes = b"") -> None:
    """Sends every tensor over every transport; reports per-transfer wall time and the CPU time that the
    sending side (this process, plus its p2pd) and the receiving side (server, plus its p2pd) spent on it."""
    _child_setup()
    import asyncio

    import grpc
    import torch
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.p2p import P2P, PeerID
    from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE
    from hivemind.proto import runtime_pb2
    from hivemind.utils import switch_to_uvloop
    from hivemind.utils.asyncio import amap_in_executor, iter_as_aiter
    from hivemind.utils.streaming import split_for_streaming

    from node.dataplane.transport import dial
    from protocol.envelope import HopSpec, make_envelope
    from protocol.grpc_options import channel_options
    from protocol.rpc_auth import SwarmAuth
    from protocol.service import StageStub
    from protocol.tensor_frames import encode_frames, tensor_bytes
    from protocol.tls import SwarmTls

    torch.set_num_threads(1)
    addresses = {name: address for name, (address, _) in servers.items()}
    sender_pids = {name: [os.getpid()] for name in transports}
    receiver_pids = {name: pids for name, (_, pids) in servers.items()}
    stack = contextlib.ExitStack()
    try:
        senders: dict[str, Callable] = {}

        # hivemind p2p, driven from a background event loop as hivemind's RemoteExpertWorker does. Started
        # first: p2pd is forked from this process, best done before gRPC has threads of its own here.
        if "p2p" in transports:
            loop = switch_to_uvloop()
            threading.Thread(target=loop.run_forever, name="p2p-loop", daemon=True).start()

            def in_loop(coro, timeout=TRANSFER_TIMEOUT_S):
                return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

            server_peer, server_maddrs = addresses["p2p"]
            p2p = in_loop(P2P.create(initial_peers=server_maddrs), STARTUP_TIMEOUT_S)
            stack.callback(lambda: in_loop(p2p.shutdown(), 10))
            sender_pids["p2p"].append(p2p._child.pid)
            server_id = PeerID.from_base58(server_peer)

            async def p2p_call(tensor, verify: bool) -> tuple[float, int]:
                uid = "verify" if verify else "bench"
                t0 = time.perf_counter()
                serialized = serialize_torch_tensor(tensor, runtime_pb2.CompressionType.NONE)
                parts = split_for_streaming(serialized, DEFAULT_MAX_MSG_SIZE)
                requests = amap_in_executor(lambda part: runtime_pb2.ExpertRequest(uid=uid, tensors=[part]),
                                            iter_as_aiter(parts))
                response = await p2p.call_protobuf_handler(server_id, P2P_HANDLER, requests,
                                                           runtime_pb2.ExpertResponse)
                elapsed = time.perf_counter() - t0
                return elapsed, int(deserialize_torch_tensor(response.tensors[0])[0]) if verify else 0

            senders["p2p"] = lambda tensor, verify: in_loop(p2p_call(tensor, verify))

        # gRPC: "grpc" is protocol/ as committed, sent as node/dataplane/transport.py sends; "grpc:NAME" is variant NAME,
        # "grpc+auth" / "grpc+tls" a private swarm's data plane; each with its own channel.
        def grpc_sender(name: str):
            limits = bench_limits(name.partition(":")[2] or None)
            addr = f"127.0.0.1:{addresses[name]}"
            security = PRIVATE.get(name)
            auth = SwarmAuth(swarm_key) if security else None
            tls = SwarmTls.derived(swarm_key) if security == "tls" else None
            raw, channel = dial(addr, channel_options(limits), auth, tls, RECEIVER)
            stack.enter_context(raw)
            grpc.channel_ready_future(raw).result(timeout=STARTUP_TIMEOUT_S)
            forward = StageStub(channel).Forward
            sign = (lambda env, meta, data: auth.sign_frames("Forward", env, meta, data)) if auth else None
            origin = HopSpec(0, "origin", "127.0.0.1:1")
            path = [origin, HopSpec(1, RECEIVER, addr), origin]
            envelopes = {v: make_envelope("bench", 0, VERIFY_MICROBATCH if v else 0, path, hop=1)
                         for v in (False, True)}

            def send(tensor, verify: bool) -> tuple[float, int]:
                t0 = time.perf_counter()
                ack = forward(encode_frames(envelopes[verify], tensor, limits, sign), timeout=TRANSFER_TIMEOUT_S)
                return time.perf_counter() - t0, ack.queued

            return send

        for name in transports:
            if name.startswith("grpc"):
                senders[name] = grpc_sender(name)

        # raw TCP
        if "tcp" in transports:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", addresses["tcp"]),
                                                                timeout=TRANSFER_TIMEOUT_S))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reply = bytearray(8)

            def send_tcp(tensor, verify: bool) -> tuple[float, int]:
                t0 = time.perf_counter()
                data = tensor_bytes(tensor)
                sock.sendall(TCP_HEADER.pack(len(data), verify))
                sock.sendall(data)
                _recv_exact_into(sock, memoryview(reply)[:8 if verify else 1])
                elapsed = time.perf_counter() - t0
                return elapsed, struct.unpack("<q", reply)[0] if verify else 0

            senders["tcp"] = send_tcp

        conn.send(("ready", None))
        results: dict[int, dict[str, dict[str, list[float]]]] = {}
        generator = torch.Generator().manual_seed(0)
        for size_mib, repeats in plan:
            tensor = torch.randn(_tensor_shape(size_mib), generator=generator, dtype=torch.float32)
            expected = _int_checksum(tensor)
            for name in transports:  # warm-up; the first transfer also proves the bytes arrive intact
                for i in range(warmup):
                    _, checksum = senders[name](tensor, verify=(i == 0))
                    if i == 0 and checksum != expected:
                        raise RuntimeError(f"{name}: receiver checksum {checksum} != sender checksum {expected}")
            stats = {name: {"wall": [], "cpu_send": [], "cpu_recv": []} for name in transports}
            for rep in range(repeats):
                shift = rep % len(transports)
                for name in transports[shift:] + transports[:shift]:
                    send0, recv0 = cpu_ns(sender_pids[name]), cpu_ns(receiver_pids[name])
                    wall = senders[name](tensor, verify=False)[0]
                    send1, recv1 = cpu_ns(sender_pids[name]), cpu_ns(receiver_pids[name])
                    stats[name]["wall"].append(wall)
                    stats[name]["cpu_send"].append((send1 - send0) / 1e9)
                    stats[name]["cpu_recv"].append((recv1 - recv0) / 1e9)
            results[size_mib] = stats
            conn.send(("progress", (size_mib, {n: statistics.median(st["wall"]) for n, st in stats.items()})))
        conn.send(("done", results))
    except BaseException as exc:  # report, then let the parent tear everything down
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        stack.close()


# ---------------------------------------------------------------------------------------------------------
# Parent: start, collect, stop
# ---------------------------------------------------------------------------------------------------------


class Children:
    """Every child process of the run; stop_all() leaves none of them (nor their p2pd) behind."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")  # no fork: gRPC and forked threads do not mix
        self.procs: list[tuple[str, mp.Process, object]] = []

    def start(self, name: str, target, *args) -> object:
        parent_conn, child_conn = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(child_conn, *args), name=f"bench-{name}", daemon=False)
        proc.start()
        child_conn.close()
        self.procs.append((name, proc, parent_conn))
        return parent_conn

    def wait_for(self, conn, name: str, kinds=("ready",), timeout: float = STARTUP_TIMEOUT_S):
        proc = next(p for _, p, c in self.procs if c is conn)
        deadline = time.monotonic() + timeout
        while not conn.poll(0.5):
            if not proc.is_alive():
                raise RuntimeError(f"{name} exited with code {proc.exitcode} (see its traceback above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no answer within {timeout:.0f} s")
        kind, payload = conn.recv()
        if kind == "error":
            raise RuntimeError(f"{name} failed: {payload}")
        if kind not in kinds:
            raise RuntimeError(f"{name}: unexpected message {kind!r}")
        return kind, payload

    def stop_all(self) -> None:
        for _, _, conn in self.procs:  # ask nicely: every server stops on any message or EOF
            with contextlib.suppress(Exception):
                conn.send("stop")
            with contextlib.suppress(Exception):
                conn.close()
        deadline = time.monotonic() + 10
        for _, proc, _ in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for _, proc, _ in self.procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.join(3)
            # Whatever is left of the group (a p2pd whose owner died) goes now.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.join(3)
        self.procs.clear()


def run_bench(sizes: list[int], repeats: dict[int, int], warmup: int,
              transports: list[str]) -> dict[int, dict[str, list[float]]]:
    children = Children()
    swarm_key = os.urandom(32)  # the private columns' swarm key, fresh for each run
    try:
        conns = {}
        for name in transports:
            if name.startswith("grpc"):
                conns[name] = children.start(f"{name}-server", grpc_server_main, name.partition(":")[2] or None,
                                             PRIVATE.get(name), swarm_key)
            elif name == "tcp":
                conns[name] = children.start("tcp-server", tcp_server_main, max(sizes) * MiB)
            elif name == "p2p":
                conns[name] = children.start("p2p-server", p2p_server_main)
        servers = {name: children.wait_for(conn, f"{name} server")[1] for name, conn in conns.items()}
        plan = [(s, repeats[s]) for s in sizes]
        client = children.start("client", client_main, servers, plan, warmup, transports, swarm_key)
        children.wait_for(client, "client")
        while True:
            kind, payload = children.wait_for(client, "client", kinds=("progress", "done"), timeout=600)
            if kind == "done":
                return payload
            size_mib, medians = payload
            line = ", ".join(f"{n} {size_mib * MiB / t / 1e6:,.0f}" for n, t in medians.items())
            print(f"  {size_mib:>3} MiB, median MB/s: {line}", flush=True)
    finally:
        children.stop_all()


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def machine_line() -> str:
    import grpc
    import hivemind
    import numpy
    import torch

    cores = os.cpu_count()
    with contextlib.suppress(Exception):
        cores = len(os.sched_getaffinity(0))
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{cpu}, {cores} cores (shared), Linux {platform.release()}; Python {platform.python_version()}, "
            f"grpcio {grpc.__version__}, hivemind {hivemind.__version__}, torch {torch.__version__}, "
            f"numpy {numpy.__version__}")


def paired_ratio(results: dict, size_mib: int, name: str, base: str = "grpc") -> tuple[float, float, float] | None:
    """`name`'s throughput as a fraction of `base`'s, paired repeat by repeat (the two ran back to back in each
    rotation): the median of the per-repeat ratios and its 95% bootstrap confidence interval."""
    ours, theirs = results[size_mib].get(name), results[size_mib].get(base)
    if not ours or not theirs:
        return None
    ratios = [b / a for a, b in zip(ours["wall"], theirs["wall"])]  # MB/s ratio = inverse wall-time ratio
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(BOOTSTRAP))
    return statistics.median(ratios), medians[int(0.025 * BOOTSTRAP)], medians[int(0.975 * BOOTSTRAP) - 1]


def render(results: dict, variants: list[str], command: str, elapsed: float) -> str:
    def med(size_mib: int, name: str, key: str) -> float | None:
        stats = results[size_mib].get(name)
        return statistics.median(stats[key]) if stats else None

    def mbps(size_mib: int, name: str) -> float | None:
        wall = med(size_mib, name, "wall")
        return size_mib * MiB / wall / 1e6 if wall else None

    def cpu_ms(size_mib: int, name: str, key: str) -> float | None:
        value = med(size_mib, name, key)
        return None if value is None else value * 1e3

    def fmt(x: float | None, spec: str, suffix: str = "") -> str:
        return "n/a" if x is None else format(x, spec) + suffix

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    lines = [
        "# Activation transfer: gRPC data plane (public, private, private + TLS) vs raw TCP vs hivemind p2p",
        "",
        "gRPC is protocol/ as committed, used as node/ uses it: `stage_service_handler` / `StageStub` (raw-bytes "
        "Forward), `encode_frames` / `decode_frames`, `channel_options` / `server_options`, `WireLimits()` "
        f"({bench_limits(None).chunk_bytes / MiB:g} MiB chunks). gRPC + auth is a private swarm's data plane: "
        "every Forward tagged by `SwarmAuth.sign_frames` and checked, header first and then every byte, by "
        "`SwarmAuth.check_frames` while it is decoded (keyed BLAKE3, protocol/rpc_auth.py). gRPC + TLS is that "
        "over TLS with the certificate derived from the swarm key (`--swarm-key` with `--tls`).",
        "",
        "| size | gRPC MB/s | gRPC + auth MB/s | gRPC + TLS MB/s | raw TCP MB/s | hivemind p2p MB/s | gRPC/p2p | "
        "gRPC/TCP | auth/gRPC | TLS/gRPC |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size_mib in results:
        g, a, s, t, p = (mbps(size_mib, n) for n in TRANSPORTS)
        lines.append(f"| {size_mib} MiB | {fmt(g, ',.0f')} | {fmt(a, ',.0f')} | {fmt(s, ',.0f')} | {fmt(t, ',.0f')} | "
                     f"{fmt(p, ',.0f')} | {fmt(ratio(g, p), '.1f', 'x')} | {fmt(ratio(g, t), '.0%')} | "
                     f"{fmt(ratio(a, g), '.0%')} | {fmt(ratio(s, g), '.0%')} |")
    def paired(size_mib: int, name: str) -> str:
        got = paired_ratio(results, size_mib, name)
        return "n/a" if got is None else f"{got[0]:.0%} ({got[1]:.0%}-{got[2]:.0%})"

    lines += ["", "Private data plane against the public one, paired repeat by repeat (each ran right after or "
              "before plain gRPC in every rotation): median of the per-repeat MB/s ratios, with its 95% bootstrap "
              "confidence interval.", "", "| size | gRPC + auth / gRPC | gRPC + TLS / gRPC |", "|---:|---:|---:|"]
    lines += [f"| {size_mib} MiB | {paired(size_mib, 'grpc+auth')} | {paired(size_mib, 'grpc+tls')} |"
              for size_mib in results]
    if 16 in results:
        g, a, s, t, p = (mbps(16, n) for n in TRANSPORTS)
        rp, rt = ratio(g, p), ratio(g, t)
        ra = paired_ratio(results, 16, "grpc+auth")
        def verdict(value, ok: bool) -> str:  # a transport this run left out is not a missed target
            return "not run" if value is None else "met" if ok else "MISSED"
        lines += ["", f"Targets at 16 MiB: gRPC >= 5x hivemind p2p: {verdict(rp, rp is not None and rp >= 5)} "
                  f"({fmt(rp, '.1f', 'x')}); gRPC >= 35% of raw TCP: {verdict(rt, rt is not None and rt >= 0.35)} "
                  f"({fmt(rt, '.0%')}); gRPC + auth >= 80% of gRPC: {verdict(ra, ra is not None and ra[0] >= 0.8)} "
                  f"({paired(16, 'grpc+auth')}). gRPC + TLS has no target: {paired(16, 'grpc+tls')} of gRPC."]
    lines += [
        "",
        "CPU per transfer (median ms of scheduler run time, all threads; sender = client process, plus its p2pd "
        "for p2p; receiver = server process, plus its p2pd for p2p). Less exposed to the shared cores' load than "
        "wall time:",
        "",
        "| size | transport | sender CPU ms | receiver CPU ms | total CPU ms |",
        "|---:|---|---:|---:|---:|",
    ]
    for size_mib in results:
        for name in [*TRANSPORTS, *(f"grpc:{v}" for v in variants)]:
            snd, rcv = cpu_ms(size_mib, name, "cpu_send"), cpu_ms(size_mib, name, "cpu_recv")
            if snd is not None:
                lines.append(f"| {size_mib} MiB | {name} | {snd:.1f} | {rcv:.1f} | {snd + rcv:.1f} |")
    if variants:
        lines += [
            "",
            "## Variants (the same protocol/ code with another chunk size)",
            "",
            "Each variant ran interleaved with the columns above, against its own server process; the "
            "`grpc` column above is unaffected by them.",
            "",
        ]
        lines += [f"- `{v}`: `WireLimits.chunk_bytes` = {VARIANTS[v] / MiB:g} MiB instead of "
                  f"{bench_limits(None).chunk_bytes / MiB:g} MiB (protocol/limits.py)." for v in variants]
        lines += ["", "| size | variant | MB/s | vs real gRPC | /p2p | /TCP | total CPU ms | CPU vs real |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for size_mib in results:
            g, t, p = (mbps(size_mib, n) for n in ("grpc", "tcp", "p2p"))
            real_cpu = (cpu_ms(size_mib, "grpc", "cpu_send") or 0) + (cpu_ms(size_mib, "grpc", "cpu_recv") or 0)
            for v in variants:
                name = f"grpc:{v}"
                m = mbps(size_mib, name)
                c = cpu_ms(size_mib, name, "cpu_send") + cpu_ms(size_mib, name, "cpu_recv")
                lines.append(f"| {size_mib} MiB | `{v}` | {fmt(m, ',.0f')} | {fmt(ratio(m, g), '.2f', 'x')} | "
                             f"{fmt(ratio(m, p), '.1f', 'x')} | {fmt(ratio(m, t), '.0%')} | {c:.1f} | "
                             f"{fmt(ratio(c, real_cpu), '.2f', 'x')} |")
    reps = ", ".join(f"{s} MiB: {max(len(v['wall']) for v in results[s].values())}" for s in results)
    lines += [
        "",
        "MB/s = 10^6 bytes per second: the median over the repeats (" + reps + "; after warm-up) for one float32 "
        f"tensor of shape (size / 16 KiB, {HIDDEN}) sent from a client process to a server process on 127.0.0.1, "
        "timed from the start of encoding to the receipt of the acknowledgement that the receiver sends once the "
        "tensor is decoded. Transports are interleaved, rotating their order each repeat. The cores are shared "
        "with other work: compare medians and ratios within one run, not absolute numbers across runs.",
        "",
        f"Machine: {machine_line()}.",
        "",
        f"Reproduce: `{command}` (this run took {elapsed:.0f} s).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES_MIB)), help="tensor sizes in MiB")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per size (default: 7, or 5 at 64 MiB+)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS),
                        help="add a column grpc:NAME, protocol/ with another chunk size (repeatable)")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help=f"subset of {','.join(TRANSPORTS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown output (default: bench/results/transport.md; with --variant: "
                             "bench/results/transport_variants.md)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    repeats = {s: args.repeats or DEFAULT_REPEATS.get(s, 5 if s >= 64 else 7) for s in sizes}
    transports = [t for t in args.transports.split(",") if t]
    if unknown := set(transports) - set(TRANSPORTS):
        parser.error(f"unknown transports {sorted(unknown)}")
    variants = list(dict.fromkeys(args.variant))
    transports += [f"grpc:{v}" for v in variants]
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first warm-up transfer verifies the bytes)")

    command = " ".join(["python bench/bench_transport.py", *(sys.argv[1:] if argv is None else argv)])
    # SIGTERM to the parent: unwind through the finally that stops the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # gRPC logs an INFO line whenever p2pd is forked next to its threads; keep the output to the table.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    print(f"transports {transports}: sizes {sizes} MiB, repeats {repeats}, warm-up {args.warmup}", flush=True)
    start = time.monotonic()
    try:
        results = run_bench(sizes, repeats, args.warmup, transports)
    except KeyboardInterrupt:
        print("interrupted; all child processes stopped", file=sys.stderr)
        return 130
    report = render(results, variants, command, time.monotonic() - start)
    print()
    print(report)
    if not args.no_write:
        default = "transport_variants.md" if variants else "transport.md"
        out = args.out or REPO / "bench" / "results" / default
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
