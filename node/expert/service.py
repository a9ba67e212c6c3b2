"""ExpertService: serve published experts' weights, and download them with their sha256 verified.

The server streams a snapshot of model.safetensors (a hard link made when the checkpoint is published), so
a newer checkpoint written by the trainer never changes the bytes of a download in progress. Before
serving, it re-hashes the file whenever its inode, size or mtime changed; a file that no longer matches
its manifest is refused with DATA_LOSS and its record withdrawn.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from experts.manifest import sha256_open_file
from node.config import ExpertConfig
from node.dataplane.transport import dial
from protocol.errors import ProtocolError, check_swarm
from protocol.generated.swarm.v1 import experts_pb2 as pb
from protocol.generated.swarm.v1 import experts_pb2_grpc as pb_grpc
from protocol.records import ExpertRecord
from protocol.service import ExpertStub, FrameMeter, no_meter

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
WEIGHTS, CONFIG, MANIFEST = "model.safetensors", "config.json", "manifest.json"


@dataclass
class _Served:
    record: ExpertRecord
    path: Path  # the snapshot of model.safetensors that matches record.sha256
    checked: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) when the bytes last matched


class ServedExperts:
    """The experts this node serves, by id. Publishing a checkpoint replaces the expert's snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Held while an expert's record is written to the DHT: a refresh that read the list before a withdrawal
        # must not store the record again after its tombstone (the later expiry would bring it back).
        self._publication = threading.Lock()
        self._by_id: dict[str, _Served] = {}

    def serve(self, record: ExpertRecord, checkpoint_dir: Path, snapshot: bool = True) -> None:
        """Serve `checkpoint_dir`'s weights; `snapshot=False` for a directory nobody writes to (a seed)."""
        if not snapshot:
            with self._lock:
                self._by_id[record.id] = _Served(record, checkpoint_dir / WEIGHTS)
            return
        snapshot = checkpoint_dir / f"served-{record.sha256[:16]}.safetensors"
        if not snapshot.exists():
            try:
                os.link(checkpoint_dir / WEIGHTS, snapshot)
            except OSError:  # a filesystem without hard links: copy instead
                snapshot.write_bytes((checkpoint_dir / WEIGHTS).read_bytes())
        with self._lock:
            old = self._by_id.get(record.id)
            self._by_id[record.id] = _Served(record, snapshot)
        if old is not None and old.path != snapshot:
            old.path.unlink(missing_ok=True)  # open downloads keep reading the old inode

    def remove(self, expert_id: str) -> ExpertRecord | None:
        with self._lock:
            served = self._by_id.pop(expert_id, None)
        return served.record if served else None

    def withdraw(self, expert_id: str, withdraw: Callable[[ExpertRecord], object]) -> ExpertRecord | None:
        """Stop serving `expert_id` and `withdraw` its record (a tombstone), as one step against `publish_each`."""
        with self._publication:
            record = self.remove(expert_id)
            if record is not None:
                withdraw(record)
        return record

    def publish_each(self, publish: Callable[[ExpertRecord], object]) -> None:
        """`publish` the record of every expert still served at the moment it is written."""
        for record in self.records():
            with self._publication:
                if self.get(record.id) is not None:
                    publish(record)

    def get(self, expert_id: str) -> _Served | None:
        with self._lock:
            return self._by_id.get(expert_id)

    def records(self) -> list[ExpertRecord]:
        with self._lock:
            return [s.record for s in self._by_id.values()]

    def matches(self, served: _Served, f) -> bool:
        """Whether the open file still holds the manifest's bytes; hashed again only when its stat changed."""
        st = os.fstat(f.fileno())
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if served.checked == key:
            return True
        if st.st_size != served.record.bytes or sha256_open_file(f) != served.record.sha256:
            return False
        served.checked = key
        return True


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    def __init__(self, swarm: str, served: ServedExperts, on_data_loss: Callable[[ExpertRecord], None],
                 on_bytes: Callable[[int], None], chunk_bytes: int = CHUNK_BYTES):
        self.swarm = swarm
        self.served = served
        self.on_data_loss = on_data_loss
        self.on_bytes = on_bytes
        self.chunk_bytes = chunk_bytes

    def FetchExpert(self, request: pb.ExpertRequest, context: grpc.ServicerContext) -> Iterator[pb.ExpertChunk]:
        try:
            check_swarm(request.swarm_id, self.swarm)
        except ProtocolError as e:  # this servicer also runs without node.host.rpc_guard (tests, tools)
            context.abort(e.code, e.reason)
        served = self.served.get(request.expert_id)
        if served is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this node serves no expert {request.expert_id!r}")
        record = served.record
        if request.sha256 and request.sha256 != record.sha256:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"expert {record.id} now has weights {record.sha256[:16]}...; re-read its record")
        if not 0 <= request.offset <= record.bytes:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is outside 0..{record.bytes}")
        try:
            f = open(served.path, "rb")
        except OSError as e:
            f = None
            reason = f"weights of expert {record.id} are unreadable ({e.strerror})"
        else:
            reason = None if self.served.matches(served, f) else \
                f"weights of expert {record.id} on disk no longer match its manifest's sha256; record withdrawn"
        if reason is not None:
            if f is not None:
                f.close()
            log.error("%s", reason)
            self.served.withdraw(record.id, self.on_data_loss)
            context.abort(grpc.StatusCode.DATA_LOSS, reason)
        with f:
            f.seek(request.offset)
            offset = request.offset
            while True:
                data = f.read(self.chunk_bytes)
                yield pb.ExpertChunk(offset=offset, total=record.bytes, sha256=record.sha256, data=data)
                self.on_bytes(len(data))
                offset += len(data)
                if offset >= record.bytes or not data:
                    break


class FetchError(Exception):
    """A download that failed; the message is one line for the operator."""


class WrongBytes(FetchError):
    """The server sent other bytes than the signed record names: a substituted or corrupted file."""


def download_expert(record: ExpertRecord, swarm: str, out_root: Path, timeout: float = ExpertConfig.fetch_timeout,
                    attempts: int = ExpertConfig.fetch_attempts, auth=None, tls=None,
                   meter: FrameMeter = no_meter) -> Path:
    """Fetch `record`'s weights into out_root/<id>/ with config.json and manifest.json.

    Bytes stream into model.safetensors.partial (a broken stream resumes from its size); only after the
    sha256 matches the manifest does the file take its final name. A mismatch deletes it.
    """
    out = Path(out_root) / record.id
    out.mkdir(parents=True, exist_ok=True)
    final, partial = out / WEIGHTS, out / (WEIGHTS + ".partial")
    if partial.exists() and partial.stat().st_size > record.bytes:
        partial.unlink()
    raw, channel = dial(record.endpoint, [], auth, tls, record.peer_id)
    with raw:
        stub = ExpertStub(channel, meter)
        for attempt in range(attempts):
            offset = partial.stat().st_size if partial.exists() else 0
            try:
                with open(partial, "ab") as f:
                    request = pb.ExpertRequest(swarm_id=swarm, expert_id=record.id, sha256=record.sha256,
                                               offset=offset)
                    for chunk in stub.FetchExpert(request, timeout=timeout):
                        if chunk.offset != f.tell():
                            partial.unlink()
                            raise FetchError(f"expert {record.id}: the server sent offset {chunk.offset}, "
                                             f"expected {f.tell()}")
                        f.write(chunk.data)
                break
            except grpc.RpcError as e:
                retriable = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                         grpc.StatusCode.CANCELLED)
                if not retriable or attempt == attempts - 1:
                    partial.unlink(missing_ok=True)
                    raise FetchError(f"expert {record.id} from {record.endpoint}: {e.code().name}: "
                                     f"{e.details()}") from None
                log.warning("expert %s: download interrupted at %d bytes (%s); resuming", record.id,
                            partial.stat().st_size, e.code().name)
    with open(partial, "rb") as f:
        actual = sha256_open_file(f)
    if actual != record.sha256:
        partial.unlink()
        raise WrongBytes(f"expert {record.id}: downloaded bytes have sha256 {actual[:16]}..., the manifest says "
                         f"{record.sha256[:16]}...; deleted")
    os.replace(partial, final)
    (out / CONFIG).write_text(json.dumps(record.manifest["config"], indent=2, sort_keys=True) + "\n")
    (out / MANIFEST).write_text(json.dumps(record.manifest, indent=2, sort_keys=True) + "\n")
    return out


def download_any(copies: list[ExpertRecord], swarm: str, out_root: Path, on_wrong_bytes: Callable[[str], None],
                 **fetch) -> tuple[Path, ExpertRecord]:
    """The first of several peers' copies of one expert (same id and sha256) that downloads and verifies.

    A copy whose bytes do not match is deleted and reported (`on_wrong_bytes`, with the reason), and the next
    one tried; the last error is raised when none succeeds. `fetch`: download_expert's keyword arguments.
    """
    if not copies:
        raise FetchError("no copy to fetch")
    error: FetchError | None = None
    for record in copies:
        try:
            return download_expert(record, swarm, out_root, **fetch), record
        except WrongBytes as e:
            on_wrong_bytes(f"{e} (served by {record.peer_id})")
            error = e
        except FetchError as e:
            error = e
    raise error
