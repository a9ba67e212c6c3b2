"""Authenticated RPCs in a private swarm: every call carries a tag made with the swarm key.

A tag is `version | timestamp | nonce | receiver | MAC` (unary calls, in the `swarm-auth-bin` metadata;
HMAC-SHA256) or `version | timestamp | nonce | header MAC | full MAC` (Forward and Backward, in
`Envelope.auth`; keyed BLAKE3 under a key derived from the swarm key, four times faster than HMAC-SHA256
over a tensor's bytes here, with the same 128-bit security).

- Every tag names its receiver's peer id, so a tag sniffed on the wire is refused by any other node.
  A unary tag may name none (`UNBOUND`) only for calls the server lets through unbound (Ping and Info:
  a client that dials an endpoint before it knows who answers); every other call needs a bound tag.
- The header MAC covers the method, the receiving peer (from the envelope's path), the envelope with its
  hop index and tag cleared (one tag per message, whatever hop it is addressed to), the tensor metadata,
  the timestamp and the nonce. The receiver checks it on the first chunk, before it reads tensor bytes.
- The full MAC extends the header MAC over the tensor's bytes as they travel; the receiver updates
  it chunk by chunk and checks it before the tensor is handed to the executor.
- A timestamp outside the clock window, or a nonce already seen within it, is refused: a tag is good
  for one call.

Refusals are `UNAUTHENTICATED` with the reason, raised as `ProtocolError`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import grpc

from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb

METADATA_KEY = "swarm-auth-bin"
_VERSION = 2  # 2: unary tags name their receiver; frame MACs are keyed BLAKE3
_HEAD = struct.Struct(">Bd16s")  # version, timestamp (unix seconds), nonce
_MAC = 32
FRAME_TAG_BYTES = _HEAD.size + 2 * _MAC
UNBOUND = ""  # the receiver a unary tag names when the caller does not know who answers
_MAX_RECEIVER = 255  # bytes of a receiver's peer id in a unary tag (its length is one byte)

# Why a call was refused; the label of the refusal counter.
MISSING, MALFORMED, STALE, REPLAYED, FORGED, FULL = "missing", "malformed", "stale", "replayed", "bad_mac", "full"
OTHER_RECEIVER, UNBOUND_REFUSED = "other_receiver", "unbound"

# What one remembered nonce costs: measured with tracemalloc (tests/protocol/test_rpc_auth.py) at about 155 bytes,
# the 16-byte nonce's bytes object and its entry in the cache.
NONCE_BYTES = 160


class AuthRefused(ProtocolError):
    def __init__(self, kind: str, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED):
        super().__init__(code, reason)
        self.kind = kind


@dataclass(frozen=True)
class AuthSettings:
    clock_window_s: float = 30.0  # how far a caller's clock may be from ours; tags older than this are stale
    # The replay cache holds every nonce of the last 2 x clock window: at most this many (x NONCE_BYTES: about
    # 30 MiB): 3,300 tagged calls a second for 60 s, far above what a node's peers make.
    max_nonces: int = 200_000


class ReplayCache:
    """Nonces seen within the last 2 x the clock window. A nonce is accepted once.

    The cache is bounded by time, not by forgetting: a nonce leaves only once its tag is stale anyway (its
    timestamp is then outside the window), so no tag can be replayed while it is fresh. When `max_entries`
    fresh nonces are held, a new call is refused (RESOURCE_EXHAUSTED, retry later) rather than one forgotten.
    """

    def __init__(self, window_s: float, max_entries: int):
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> time first seen, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def first_time(self, nonce: bytes, now: float) -> bool:
        """True the first time `nonce` is seen; False for a replay; AuthRefused(FULL) when no room is left."""
        with self._lock:
            horizon = now - 2 * self.window_s  # a tag first seen before this is stale by now
            while self._seen and next(iter(self._seen.values())) < horizon:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return False
            if len(self._seen) >= self.max_entries:
                raise AuthRefused(FULL, f"this node holds {len(self._seen)} fresh call tags, its limit: retry "
                                        f"shortly", grpc.StatusCode.RESOURCE_EXHAUSTED)
            self._seen[nonce] = now
            return True


class BodyCheck:
    """The full MAC of a Forward or Backward, computed while its chunks arrive."""

    def __init__(self, mac: "blake3.blake3", expected: bytes):
        self._mac = mac
        self._expected = expected

    def update(self, piece) -> None:
        self._mac.update(piece)

    def finish(self) -> None:
        if not hmac.compare_digest(self._mac.digest(), self._expected):
            raise AuthRefused(FORGED, "the tensor bytes do not match the call's tag")


class SwarmAuth:
    """Makes and checks call tags with one swarm key."""

    def __init__(self, key: bytes, settings: AuthSettings = AuthSettings(), clock: Callable[[], float] = time.time):
        self._key = key
        # Frames are MACed with keyed BLAKE3 under a key of their own, derived from the swarm key.
        self._frame_key = blake3.blake3(key, derive_key_context="swarm-node 2026 frame MAC v2").digest()
        self.settings = settings
        self._clock = clock
        self._replays = ReplayCache(settings.clock_window_s, settings.max_nonces)

    # ---- Forward and Backward --------------------------------------------------------------------------------
    def sign_frames(self, method: str, envelope: pb.Envelope, meta: pb.TensorMeta, data) -> bytes:
        head = _HEAD.pack(_VERSION, self._clock(), secrets.token_bytes(16))
        mac = self._frame_mac(method, envelope, meta, head)
        head_mac = mac.copy().digest()
        mac.update(data)
        return head + head_mac + mac.digest()

    def check_frames(self, method: str, envelope: pb.Envelope, meta: pb.TensorMeta, receiver: str) -> BodyCheck:
        """Check the header of a Forward or Backward addressed to `receiver` (this node); returns the check to
        feed its tensor bytes to."""
        tag = envelope.auth
        if not tag:
            raise AuthRefused(MISSING, "this swarm is private: the call carries no auth tag (give --swarm-key)")
        _check_version(tag)
        if len(tag) != FRAME_TAG_BYTES:
            raise AuthRefused(MALFORMED, f"auth tag of {len(tag)} bytes is malformed")
        head, head_mac, full_mac = tag[:_HEAD.size], tag[_HEAD.size:-_MAC], tag[-_MAC:]
        mac = self._frame_mac(method, envelope, meta, head)
        if not hmac.compare_digest(mac.copy().digest(), head_mac):
            raise AuthRefused(FORGED, "auth tag does not verify under this swarm's key")
        named = _receiver(envelope)
        if named != receiver:  # refused before a byte of the tensor is read
            raise AuthRefused(OTHER_RECEIVER, f"auth tag was made for receiver {_short(named)}, not this node "
                                              f"{_short(receiver)}: a tag replayed from another node is refused")
        self._fresh(head)
        return BodyCheck(mac, full_mac)

    def _frame_mac(self, method: str, envelope: pb.Envelope, meta: pb.TensorMeta, head: bytes) -> "blake3.blake3":
        bare = pb.Envelope()
        bare.CopyFrom(envelope)
        bare.hop, bare.auth = 0, b""
        mac = blake3.blake3(key=self._frame_key)
        _absorb(mac, (b"swarm-node frames v2", method.encode(), _receiver(envelope).encode(), head,
                      bare.SerializeToString(deterministic=True), meta.SerializeToString(deterministic=True)))
        return mac

    # ---- unary calls -----------------------------------------------------------------------------------------
    def sign_unary(self, method: str, request: bytes, receiver: str) -> bytes:
        """A tag for one call of `method` to the node whose peer id is `receiver` (or UNBOUND)."""
        named = receiver.encode()
        if len(named) > _MAX_RECEIVER:
            raise ValueError(f"peer id {receiver[:16]}... is longer than {_MAX_RECEIVER} bytes")
        head = _HEAD.pack(_VERSION, self._clock(), secrets.token_bytes(16)) + bytes([len(named)]) + named
        return head + self._unary_mac(method, request, head)

    def check_unary(self, method: str, request: bytes, tag: bytes | None, receiver: str,
                    unbound_ok: bool = False) -> None:
        """Refuse unless `tag` verifies, names `receiver` (this node) or, where `unbound_ok`, no one, and is fresh."""
        if not tag:
            raise AuthRefused(MISSING, "this swarm is private: the call carries no auth tag (give --swarm-key)")
        _check_version(tag)
        size = tag[_HEAD.size] if len(tag) > _HEAD.size else -1
        if size < 0 or len(tag) != _HEAD.size + 1 + size + _MAC:
            raise AuthRefused(MALFORMED, f"auth tag of {len(tag)} bytes is malformed")
        head = tag[:-_MAC]
        if not hmac.compare_digest(self._unary_mac(method, request, head), tag[-_MAC:]):
            raise AuthRefused(FORGED, "auth tag does not verify under this swarm's key")
        named = head[_HEAD.size + 1:].decode(errors="replace")
        if named == UNBOUND and not unbound_ok:
            raise AuthRefused(UNBOUND_REFUSED, f"auth tag names no receiver: {method} needs a tag bound to this "
                                               f"node's peer id {_short(receiver)}")
        if named not in (UNBOUND, receiver):
            raise AuthRefused(OTHER_RECEIVER, f"auth tag was made for receiver {_short(named)}, not this node "
                                              f"{_short(receiver)}: a tag replayed from another node is refused")
        self._fresh(head[:_HEAD.size])

    def _unary_mac(self, method: str, request: bytes, head: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        _absorb(mac, (b"swarm-node unary v2", method.encode(), head, request))
        return mac.digest()

    def _fresh(self, head: bytes) -> None:
        """Refuse stale timestamps and nonces seen before; called only once the MAC verified."""
        _, stamp, nonce = _HEAD.unpack(head)
        now = self._clock()
        skew = now - stamp
        if not abs(skew) <= self.settings.clock_window_s:  # also refuses NaN
            raise AuthRefused(STALE, f"auth tag is {skew:.0f}s from this node's clock (window "
                                     f"{self.settings.clock_window_s:.0f}s): a stale or replayed call, or clocks "
                                     f"out of sync")
        if not self._replays.first_time(nonce, now):
            raise AuthRefused(REPLAYED, "auth tag was already used: replayed call refused")


def _absorb(mac, parts) -> None:
    """Each part, length-prefixed, so that no two different sequences of parts feed the MAC the same bytes."""
    for part in parts:
        mac.update(struct.pack(">I", len(part)))
        mac.update(part)


def _receiver(envelope: pb.Envelope) -> str:
    """The peer a Forward or Backward is addressed to: its path's hop."""
    return envelope.path[envelope.hop].peer_id if 0 <= envelope.hop < len(envelope.path) else UNBOUND


def _check_version(tag: bytes) -> None:
    if tag[0] != _VERSION:
        raise AuthRefused(MALFORMED, f"auth tag version {tag[0]}; this node speaks version {_VERSION}: run the "
                                     f"same swarm-node release on every member")


def _short(peer_id: str) -> str:
    return f"...{peer_id[-8:]}" if peer_id else "(none)"


# ---- gRPC glue -------------------------------------------------------------------------------------------------
class ServerAuthInterceptor(grpc.ServerInterceptor):
    """Checks the tag of every unary-request call before its handler runs, for every service but health.

    Tags must name this node (`receiver`), except for the methods in `unbound_ok`, which also take an
    unbound tag. Streaming-request methods must check their own tags (Forward and Backward carry them in
    the envelope); any other streaming-request method is refused, so a method added later is never open.
    """

    def __init__(self, auth: SwarmAuth, receiver: str, self_checked: set[str], unbound_ok: set[str],
                 on_refused: Callable[[str, str], None]):
        self.auth = auth
        self.receiver = receiver  # this node's peer id
        self.self_checked = self_checked  # full method names, e.g. /swarm.v1.StageService/Forward
        self.unbound_ok = unbound_ok  # full method names that answer an unbound tag
        self.on_refused = on_refused

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith("/grpc.health.v1.") or method in self.self_checked:
            return handler
        if handler.request_streaming:
            return _refusing_handler(handler, AuthRefused(MALFORMED, f"{method} cannot be authenticated"),
                                     lambda: self.on_refused(method, MALFORMED))
        tag = dict(details.invocation_metadata).get(METADATA_KEY)
        return _checking_handler(handler, method, tag, self)


def _checking_handler(handler: grpc.RpcMethodHandler, method: str, tag: bytes | None,
                      interceptor: ServerAuthInterceptor) -> grpc.RpcMethodHandler:
    serialize = handler.request_deserializer  # requests arrive deserialized; the tag covers their bytes

    def check(request, context) -> None:
        try:
            raw = request.SerializeToString(deterministic=True) if serialize is not None else bytes(request)
            interceptor.auth.check_unary(method, raw, tag, interceptor.receiver, method in interceptor.unbound_ok)
        except AuthRefused as e:
            interceptor.on_refused(method, e.kind)
            context.abort(e.code, e.reason)

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        def unary_unary(request, context):
            check(request, context)
            return inner(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
    inner_stream = handler.unary_stream

    def unary_stream(request, context):
        check(request, context)
        yield from inner_stream(request, context)
    return grpc.unary_stream_rpc_method_handler(unary_stream, request_deserializer=handler.request_deserializer,
                                                response_serializer=handler.response_serializer)


def _refusing_handler(handler: grpc.RpcMethodHandler, error: AuthRefused, note: Callable[[], None]):
    def refuse(request_iterator, context):
        note()
        context.abort(error.code, error.reason)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(refuse, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=handler.request_deserializer,
                                                response_serializer=handler.response_serializer)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class ClientAuthInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds a fresh tag, bound to `receiver` (a peer id, or UNBOUND), to every unary-request call on the channel."""

    def __init__(self, auth: SwarmAuth, receiver: str):
        self.auth = auth
        self.receiver = receiver

    def _tagged(self, details: grpc.ClientCallDetails, request) -> grpc.ClientCallDetails:
        raw = request.SerializeToString(deterministic=True) if hasattr(request, "SerializeToString") else bytes(request)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        tag = self.auth.sign_unary(method, raw, self.receiver)
        return _ClientCallDetails(details, [*(details.metadata or ()), (METADATA_KEY, tag)])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._tagged(client_call_details, request), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._tagged(client_call_details, request), request)
