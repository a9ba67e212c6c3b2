import grpc
import pytest
import torch

from protocol.envelope import HopSpec, make_envelope
from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.limits import WireLimits
from protocol.state_frames import decode_state, encode_state
from protocol.tensor_frames import decode_frames, encode_frames

PATH = [HopSpec(0, "a", "h:1"), HopSpec(1, "b", "h:2"), HopSpec(0, "a", "h:1")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_across_chunks(dtype):
    limits = WireLimits(chunk_bytes=1000)
    tensor = torch.randn(3, 17, 64).to(dtype)
    frames = list(encode_frames(make_envelope("s", 2, 5, PATH, 1), tensor, limits))
    assert len(frames) > 1
    env, out = decode_frames(frames, limits)
    assert torch.equal(out, tensor) and out.dtype == dtype
    assert (env.round, env.microbatch, env.hop) == (2, 5, 1)


def test_frames_are_plain_protobuf_both_ways():
    """Hand-built frames parse as TensorChunk, and protobuf-built chunks (any field order) decode."""
    limits = WireLimits(chunk_bytes=700)
    tensor = torch.arange(600, dtype=torch.float32).view(2, 300)
    env = make_envelope("s", 1, 2, PATH, 1)
    frames = list(encode_frames(env, tensor, limits))
    chunks = [pb.TensorChunk.FromString(f) for f in frames]
    assert chunks[0].envelope == env and list(chunks[0].meta.shape) == [2, 300]
    assert b"".join(c.data for c in chunks) == tensor.numpy().tobytes()
    # The same chunks serialised by protobuf itself (which writes fields in number order).
    _, out = decode_frames([c.SerializeToString() for c in chunks], limits)
    assert torch.equal(out, tensor)


def test_truncated_stream_is_refused():
    limits = WireLimits(chunk_bytes=1000)
    frames = list(encode_frames(make_envelope("s", 0, 0, PATH, 1), torch.zeros(10, 100), limits))
    with pytest.raises(ProtocolError, match="ended after"):
        decode_frames(frames[:-1], limits)
    with pytest.raises(ProtocolError, match="malformed chunk"):
        decode_frames([frames[0][:-3]], limits)
    with pytest.raises(ProtocolError, match="only the first chunk"):
        decode_frames([frames[0], frames[0]], limits)


def test_announced_size_must_match_shape():
    first = pb.TensorChunk(envelope=make_envelope("s", 0, 0, PATH, 1),
                           meta=pb.TensorMeta(dtype="float32", shape=[2, 3], codec="raw", nbytes=4), data=b"1234")
    with pytest.raises(ProtocolError, match="does not match shape"):
        decode_frames([first.SerializeToString()], WireLimits())


def test_oversize_tensor_refused_before_reading_its_bytes():
    limits = WireLimits(max_tensor_bytes=1 << 20)
    meta = pb.TensorMeta(dtype="float32", shape=[1024, 1024], codec="raw", nbytes=4 << 20)
    chunk = pb.TensorChunk(envelope=make_envelope("s", 0, 0, PATH, 1), meta=meta)
    with pytest.raises(ProtocolError) as e:
        decode_frames([chunk.SerializeToString()], limits)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_dtype_codec_and_garbage():
    env = make_envelope("s", 0, 0, PATH, 1)
    for meta, message in [(pb.TensorMeta(dtype="complex32", shape=[1], codec="raw", nbytes=4), "unknown dtype"),
                          (pb.TensorMeta(dtype="float32", shape=[1], codec="zstd", nbytes=4), "unknown codec")]:
        with pytest.raises(ProtocolError, match=message):
            decode_frames([pb.TensorChunk(envelope=env, meta=meta, data=b"0000").SerializeToString()], WireLimits())
    for garbage in [b"\xff\xff\xff", b"\x0a\x05ab", b""]:
        with pytest.raises(ProtocolError):
            decode_frames([garbage], WireLimits())


def test_state_round_trip():
    tensors = {"param/w": torch.randn(4, 4), "exp_avg/w": torch.randn(4, 4)}
    round_, out, meta = decode_state(encode_state(tensors, {"completed_round": "3"}, 3, chunk_bytes=64))
    assert round_ == 3 and meta == {"completed_round": "3"}
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
