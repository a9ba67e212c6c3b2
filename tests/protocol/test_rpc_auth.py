"""Call tags: bound to their receiver; frames checked header first, then every byte; the replay cache bounded by
the clock window, never by forgetting a fresh nonce, its memory measured."""

import secrets
import tracemalloc

import grpc
import pytest

import torch

from protocol.envelope import HopSpec, make_envelope
from protocol.limits import WireLimits
from protocol.rpc_auth import (FORGED, FULL, MALFORMED, NONCE_BYTES, OTHER_RECEIVER, UNBOUND, UNBOUND_REFUSED,
                               AuthRefused, AuthSettings, ReplayCache, SwarmAuth)
from protocol.tensor_frames import decode_frames, encode_frames


def test_a_nonce_is_good_once_until_it_is_stale_anyway():
    cache = ReplayCache(window_s=30, max_entries=10)
    assert cache.first_time(b"n" * 16, now=0)
    assert not cache.first_time(b"n" * 16, now=59)  # within 2 x window: its tag may still look fresh
    assert cache.first_time(b"m" * 16, now=61) and len(cache) == 1  # the old one aged out on its own


def test_a_full_cache_refuses_new_calls_instead_of_forgetting_fresh_nonces():
    cache = ReplayCache(window_s=30, max_entries=3)
    for i in range(3):
        assert cache.first_time(bytes([i]) * 16, now=i)
    with pytest.raises(AuthRefused) as e:
        cache.first_time(b"x" * 16, now=3)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.kind == FULL
    assert not cache.first_time(bytes([0]) * 16, now=4)  # the oldest is still remembered: still a replay
    assert cache.first_time(b"x" * 16, now=61)  # room again once the first nonces are stale


def test_a_replayed_unary_tag_is_refused_and_a_full_cache_says_so():
    auth = SwarmAuth(b"k" * 32, AuthSettings(max_nonces=1))
    tag = auth.sign_unary("/m", b"request", "B")
    auth.check_unary("/m", b"request", tag, "B")
    with pytest.raises(AuthRefused, match="replayed"):
        auth.check_unary("/m", b"request", tag, "B")
    with pytest.raises(AuthRefused, match="retry shortly"):
        auth.check_unary("/m", b"request", auth.sign_unary("/m", b"request", "B"), "B")


def test_the_stated_memory_per_nonce_holds():
    n = 20_000
    tags = [secrets.token_bytes(40) for _ in range(n)]  # a nonce is sliced out of each call's tag
    tracemalloc.start()
    try:
        cache = ReplayCache(window_s=30, max_entries=n)
        before = tracemalloc.get_traced_memory()[0]
        for tag in tags:
            cache.first_time(tag[9:25], now=0)
        per_nonce = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert 100 < per_nonce <= NONCE_BYTES, per_nonce
    assert AuthSettings().max_nonces * NONCE_BYTES <= 32 << 20  # the bound the settings state: about 30 MiB


def _refusal(call) -> AuthRefused:
    with pytest.raises(AuthRefused) as e:
        call()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    return e.value


def test_a_unary_tag_is_good_only_at_the_receiver_it_names():
    auth = SwarmAuth(b"k" * 32)
    tag = auth.sign_unary("/m", b"request", "QmPeerA")
    refused = _refusal(lambda: auth.check_unary("/m", b"request", tag, "QmPeerB"))
    assert refused.kind == OTHER_RECEIVER and "receiver ...QmPeerA, not this node ...QmPeerB" in refused.reason
    auth.check_unary("/m", b"request", tag, "QmPeerA")  # not spent by the refusal above
    # The receiver is under the MAC: renaming it in the tag breaks the tag.
    renamed = tag.replace(b"QmPeerA", b"QmPeerB")
    assert _refusal(lambda: auth.check_unary("/m", b"request", renamed, "QmPeerB")).kind == FORGED


def test_an_unbound_tag_is_good_only_where_the_server_allows_it():
    auth = SwarmAuth(b"k" * 32)
    refused = _refusal(lambda: auth.check_unary("/m", b"r", auth.sign_unary("/m", b"r", UNBOUND), "QmPeerB"))
    assert refused.kind == UNBOUND_REFUSED and "names no receiver" in refused.reason
    auth.check_unary("/m", b"r", auth.sign_unary("/m", b"r", UNBOUND), "QmPeerB", unbound_ok=True)


def test_tags_of_another_version_or_shape_are_malformed():
    auth = SwarmAuth(b"k" * 32)
    tag = auth.sign_unary("/m", b"r", "B")
    for bad in (bytes([1]) + tag[1:], tag[:-1], tag + b"x"):
        assert _refusal(lambda: auth.check_unary("/m", b"r", bad, "B")).kind == MALFORMED


def _frames(auth, tensor, receiver="QmPeerB"):
    path = [HopSpec(0, "QmOrigin", "127.0.0.1:1"), HopSpec(1, receiver, "127.0.0.1:2"),
            HopSpec(0, "QmOrigin", "127.0.0.1:1")]
    env = make_envelope("s", 0, 0, path, hop=1)
    return list(encode_frames(env, tensor, WireLimits(chunk_bytes=1 << 16),
                              lambda e, m, d: auth.sign_frames("Forward", e, m, d)))


def test_frame_tags_cover_the_header_and_every_byte():
    auth, tensor = SwarmAuth(b"k" * 32), torch.randn(16, 4096)  # four 64 KiB chunks
    check = lambda e, m: auth.check_frames("Forward", e, m, "QmPeerB")  # noqa: E731
    _, got = decode_frames(_frames(auth, tensor), WireLimits(), check)
    assert torch.equal(got, tensor)
    # One bit flipped in a middle chunk: the body check fails before the tensor is handed on.
    frames = _frames(auth, tensor)
    frames[2] = frames[2][:100] + bytes([frames[2][100] ^ 1]) + frames[2][101:]
    with pytest.raises(AuthRefused, match="tensor bytes"):
        decode_frames(frames, WireLimits(), check)
    # Another key: refused on the first chunk, whose bytes are never read.
    other = SwarmAuth(b"x" * 32)

    def first_only():
        yield _frames(other, tensor)[0]
        raise AssertionError("read past the first chunk")
    with pytest.raises(AuthRefused, match="does not verify"):
        decode_frames(first_only(), WireLimits(), check)
    # Addressed to another peer: refused on the first chunk, under its own reason.
    with pytest.raises(AuthRefused, match="made for receiver ...QmPeerC, not this node ...QmPeerB") as e:
        decode_frames(iter(_frames(auth, tensor, receiver="QmPeerC")[:1]), WireLimits(), check)
    assert e.value.kind == OTHER_RECEIVER
