"""FetchExpert and the download client in one process: chunking, resuming, verification, refusals."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from node.expert.service import (ExpertServicer, FetchError, ServedExperts, WrongBytes, download_any,
                                 download_expert)
from protocol.generated.swarm.v1 import experts_pb2 as pb
from protocol.generated.swarm.v1 import experts_pb2_grpc as pb_grpc
from protocol.records import ExpertRecord

SWARM = "s"


def make_record(weights: bytes, endpoint: str, expert_id: str = "code-x-0") -> ExpertRecord:
    manifest = {"name": expert_id, "domain": "code", "config": {"model_type": "llama"}, "tokenizer": "bytes-v1",
                "seed_hash": "", "parent": None, "lineage": [], "steps": 5, "target_steps": 5, "tokens": 10,
                "flops": 1.0, "val_ppl": 3.0, "weights_sha256": hashlib.sha256(weights).hexdigest(), "extra": {},
                "format": "swarm-node/expert-v1"}
    return ExpertRecord(id=expert_id, peer_id="p", endpoint=endpoint, bytes=len(weights), dev_loss=1.1,
                        manifest=manifest)


@pytest.fixture
def server(tmp_path):
    """A served expert of 10 000 bytes, streamed in 1 000-byte chunks."""
    weights = bytes(range(256)) * 39 + b"0123456789abcdef"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(weights)
    served, lost, sent = ServedExperts(), [], []
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=4))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    pb_grpc.add_ExpertServiceServicer_to_server(
        ExpertServicer(SWARM, served, on_data_loss=lost.append, on_bytes=sent.append, chunk_bytes=1000), grpc_server)
    grpc_server.start()
    record = make_record(weights, f"127.0.0.1:{port}")
    served.serve(record, ckpt)
    yield record, ckpt, served, lost, sent
    grpc_server.stop(0)


def test_fetch_verifies_and_resumes(server, tmp_path):
    record, ckpt, _, _, sent = server
    out = download_expert(record, SWARM, tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "manifest.json"}
    assert sum(sent) == record.bytes and len(sent) == 10
    # A download cut off after 3 500 bytes continues from there.
    again = tmp_path / "again" / record.id
    again.mkdir(parents=True)
    (again / "model.safetensors.partial").write_bytes((ckpt / "model.safetensors").read_bytes()[:3500])
    sent.clear()
    download_expert(record, SWARM, tmp_path / "again")
    assert sum(sent) == record.bytes - 3500
    assert (again / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()


def test_refusals_have_a_status_and_a_reason(server, tmp_path):
    record, _, _, _, _ = server
    stub = pb_grpc.ExpertServiceStub(grpc.insecure_channel(record.endpoint))
    for request, code in [(pb.ExpertRequest(swarm_id=SWARM, expert_id="nope"), grpc.StatusCode.NOT_FOUND),
                          (pb.ExpertRequest(swarm_id="other", expert_id=record.id), grpc.StatusCode.PERMISSION_DENIED),
                          (pb.ExpertRequest(swarm_id=SWARM, expert_id=record.id, sha256="0" * 64),
                           grpc.StatusCode.FAILED_PRECONDITION),
                          (pb.ExpertRequest(swarm_id=SWARM, expert_id=record.id, offset=10**9),
                           grpc.StatusCode.OUT_OF_RANGE)]:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.FetchExpert(request, timeout=5))
        assert e.value.code() == code and e.value.details()
    with pytest.raises(FetchError, match="NOT_FOUND"):
        download_expert(make_record(b"x", record.endpoint, "nope"), SWARM, tmp_path)


def test_changed_file_is_data_loss_and_withdrawn(server, tmp_path):
    record, ckpt, served, lost, _ = server
    with open(ckpt / "model.safetensors", "r+b") as f:  # the served snapshot is a hard link: same bytes
        f.seek(123)
        f.write(b"\xff")
    with pytest.raises(FetchError, match="DATA_LOSS"):
        download_expert(record, SWARM, tmp_path / "out")
    assert lost == [record] and served.get(record.id) is None
    assert not (tmp_path / "out" / record.id / "model.safetensors").exists()
    assert not (tmp_path / "out" / record.id / "model.safetensors.partial").exists()


@pytest.fixture
def liar(server):
    """A peer that serves other bytes (of the right size) under the server's expert id and sha256."""
    record = server[0]

    class Lying(pb_grpc.ExpertServiceServicer):
        def FetchExpert(self, request, context):
            yield pb.ExpertChunk(offset=0, total=record.bytes, sha256=record.sha256, data=b"x" * record.bytes)
    liar = grpc.server(ThreadPoolExecutor(max_workers=2))
    port = liar.add_insecure_port("127.0.0.1:0")
    pb_grpc.add_ExpertServiceServicer_to_server(Lying(), liar)
    liar.start()
    yield ExpertRecord(**{**vars(record), "peer_id": "liar", "endpoint": f"127.0.0.1:{port}"})
    liar.stop(0)


def test_bytes_that_do_not_match_the_manifest_are_deleted(server, liar, tmp_path):
    """The client verifies what it received: a server that streams other bytes than the manifest names."""
    with pytest.raises(WrongBytes, match="deleted"):
        download_expert(liar, SWARM, tmp_path / "o")
    assert not list((tmp_path / "o" / liar.id).glob("model.safetensors*"))


def test_a_substituted_copy_is_refused_and_the_next_copy_fetched(server, liar, tmp_path):
    record, ckpt = server[0], server[1]
    refused = []
    path, source = download_any([liar, record], SWARM, tmp_path / "o", on_wrong_bytes=refused.append)
    assert source == record and (path / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert len(refused) == 1 and "served by liar" in refused[0]
    with pytest.raises(WrongBytes):  # no honest copy: the last refusal is the error
        download_any([liar], SWARM, tmp_path / "p", on_wrong_bytes=refused.append)
    with pytest.raises(FetchError, match="no copy"):
        download_any([], SWARM, tmp_path / "q", on_wrong_bytes=refused.append)


def test_a_refresh_never_publishes_a_record_again_after_its_withdrawal(tmp_path):
    """The expert node's refresh reads the served list, then writes each record; a data-loss withdrawal of one of
    them in between must not be followed by a write of it (the write's later expiry would outlive the
    tombstone, and the corrupt expert would be listed again: seen in the experts swarm test)."""
    served, order = ServedExperts(), []
    for expert_id in ("code-x-0", "code-x-1"):
        (tmp_path / expert_id).mkdir()
        (tmp_path / expert_id / "model.safetensors").write_bytes(b"w")
        served.serve(make_record(b"w", "127.0.0.1:1", expert_id), tmp_path / expert_id, snapshot=False)
    withdrawing = []

    def publish(record: ExpertRecord) -> None:
        order.append(("publish", record.id))
        if record.id == "code-x-0":  # the refresh has read both; the second is withdrawn meanwhile
            thread = threading.Thread(target=served.withdraw,
                                      args=("code-x-1", lambda r: order.append(("withdraw", r.id))))
            thread.start()
            withdrawing.append(thread)
            thread.join(0.2)  # it waits for this write to end

    served.publish_each(publish)
    withdrawing[0].join(5)
    assert ("withdraw", "code-x-1") in order
    after = order[order.index(("withdraw", "code-x-1")):]
    assert ("publish", "code-x-1") not in after, order
    assert served.get("code-x-1") is None and served.get("code-x-0") is not None
