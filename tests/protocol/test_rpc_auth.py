"""The replay cache: bounded by the clock window, never by forgetting a fresh nonce; its memory measured."""

import secrets
import tracemalloc

import grpc
import pytest

from protocol.rpc_auth import FULL, NONCE_BYTES, AuthRefused, AuthSettings, ReplayCache, SwarmAuth


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
    tag = auth.sign_unary("/m", b"request")
    auth.check_unary("/m", b"request", tag)
    with pytest.raises(AuthRefused, match="replayed"):
        auth.check_unary("/m", b"request", tag)
    with pytest.raises(AuthRefused, match="retry shortly"):
        auth.check_unary("/m", b"request", auth.sign_unary("/m", b"request"))


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
