import grpc
import pytest
import torch

from protocol.envelope import HopSpec, make_envelope
from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.limits import WireLimits
from protocol.state_codec import decode_state, encode_state
from protocol.tensor_codec import decode_stream, encode_chunks

PATH = [HopSpec(0, "a", "h:1"), HopSpec(1, "b", "h:2"), HopSpec(0, "a", "h:1")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_across_chunks(dtype):
    limits = WireLimits(chunk_bytes=1000)
    tensor = torch.randn(3, 17, 64).to(dtype)
    chunks = list(encode_chunks(make_envelope("s", 2, 5, PATH, 1), tensor, limits))
    assert len(chunks) > 1 and chunks[1].HasField("envelope") is False
    env, out = decode_stream(chunks, limits)
    assert torch.equal(out, tensor) and out.dtype == dtype
    assert (env.round, env.microbatch, env.hop) == (2, 5, 1)


def test_truncated_stream_is_refused():
    limits = WireLimits(chunk_bytes=1000)
    chunks = list(encode_chunks(make_envelope("s", 0, 0, PATH, 1), torch.zeros(10, 100), limits))
    with pytest.raises(ProtocolError, match="ended after"):
        decode_stream(chunks[:-1], limits)


def test_announced_size_must_match_shape():
    first = pb.TensorChunk(envelope=make_envelope("s", 0, 0, PATH, 1),
                           meta=pb.TensorMeta(dtype="float32", shape=[2, 3], codec="raw", nbytes=4), data=b"1234")
    with pytest.raises(ProtocolError, match="does not match shape"):
        decode_stream([first], WireLimits())


def test_oversize_tensor_refused_before_reading_its_bytes():
    limits = WireLimits(max_tensor_bytes=1 << 20)
    meta = pb.TensorMeta(dtype="float32", shape=[1024, 1024], codec="raw", nbytes=4 << 20)
    with pytest.raises(ProtocolError) as e:
        decode_stream([pb.TensorChunk(envelope=make_envelope("s", 0, 0, PATH, 1), meta=meta)], limits)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_dtype_and_codec():
    env = make_envelope("s", 0, 0, PATH, 1)
    for meta, message in [(pb.TensorMeta(dtype="complex32", shape=[1], codec="raw", nbytes=4), "unknown dtype"),
                          (pb.TensorMeta(dtype="float32", shape=[1], codec="zstd", nbytes=4), "unknown codec")]:
        with pytest.raises(ProtocolError, match=message):
            decode_stream([pb.TensorChunk(envelope=env, meta=meta, data=b"0000")], WireLimits())


def test_state_round_trip():
    tensors = {"param/w": torch.randn(4, 4), "exp_avg/w": torch.randn(4, 4)}
    round_, out, meta = decode_state(encode_state(tensors, {"completed_round": "3"}, 3, chunk_bytes=64))
    assert round_ == 3 and meta == {"completed_round": "3"}
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
