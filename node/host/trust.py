"""What a node trusts and how it proves itself: its identity, the swarm key, record validators, RPC tags.

Built once from the config; the daemon plugs its parts into the DHT (validators), the gRPC server
(an interceptor and the Forward/Backward tag check), and the clients (tags on every call).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from node.errors import UsageError
from node.host.metrics import NodeMetrics
from protocol.notice_auth import NoticeSigner
from protocol.record_auth import RefusalCounter, load_identity, record_validators
from protocol.rpc_auth import ServerAuthInterceptor, SwarmAuth
from protocol.service import SERVICE
from protocol.swarm_key import load_key_file
from protocol.tls import SwarmTls

if TYPE_CHECKING:
    from hivemind.dht import DHT

# Methods that carry their tag inside the message (Envelope.auth), checked while the tensor streams in.
SELF_AUTHENTICATED = {f"/{SERVICE}/Forward", f"/{SERVICE}/Backward"}
# Read-only calls that tell nothing of value, answered to a tag bound to no receiver: a client may dial an
# endpoint before it knows whose it is (the reachability dial-back, a first Ping). Every other call needs a
# tag bound to this node's peer id, so a sniffed tag cannot be replayed to another member.
UNBOUND_OK = {f"/{SERVICE}/Ping", f"/{SERVICE}/Info"}


@dataclass
class NodeTrust:
    identity_path: str
    temporary_identity: bool
    validators: list
    refused_records: RefusalCounter  # shared with the DHT process, which refuses forged records
    auth: SwarmAuth | None  # None in a public swarm
    signer: NoticeSigner  # signs this node's control messages with its identity (every swarm)
    tls: SwarmTls | None = None  # None: plaintext gRPC

    @classmethod
    def create(cls, identity_path: str, swarm_key_path: str, tls: bool = False, tls_cert: str = "",
               tls_key: str = "") -> "NodeTrust":
        swarm_key = None
        if swarm_key_path:
            try:
                swarm_key = load_key_file(swarm_key_path)
            except ValueError as e:
                raise UsageError(str(e)) from None
        swarm_tls = _tls(swarm_key, tls, tls_cert, tls_key)
        try:
            path, private_key, temporary = load_identity(identity_path or None)
        except (OSError, ValueError) as e:
            raise UsageError(f"--identity-path {identity_path}: {e}") from None
        refused = RefusalCounter()
        return cls(path, temporary, record_validators(private_key, swarm_key, refused), refused,
                   SwarmAuth(swarm_key) if swarm_key is not None else None, NoticeSigner(private_key), swarm_tls)

    @property
    def owner(self) -> bytes:
        """The subkey this node writes its records under; only its identity can sign for it."""
        return self.validators[0].local_public_key

    def dht_kwargs(self) -> dict:
        # A fresh identity cannot be taken already; skipping the check saves starting a second p2pd.
        return dict(identity_path=self.identity_path, record_validators=self.validators,
                    check_if_identity_free=not self.temporary_identity)

    def add_port(self, server: grpc.Server, host: str, port: int) -> int:
        """Serve `server` on host:port, over TLS when the swarm runs it; the bound port (UsageError if taken)."""
        address = f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address) if self.tls is None else \
                server.add_secure_port(address, self.tls.server_credentials())
        except RuntimeError:  # grpc reports a failed bind this way
            bound = 0
        if not bound:
            raise UsageError(f"cannot serve gRPC on {address}: is the port taken? Pick another --port")
        return bound

    def server_interceptors(self, metrics: NodeMetrics, peer_id: str) -> list[grpc.ServerInterceptor]:
        """What checks every call's tag in a private swarm; tags must name `peer_id`, this node."""
        if self.auth is None:
            return []
        return [ServerAuthInterceptor(self.auth, peer_id, SELF_AUTHENTICATED, UNBOUND_OK,
                                      on_refused=lambda method, reason: metrics.auth_refused.labels(
                                          method=method.rsplit("/", 1)[-1], reason=reason).inc())]

    def close(self) -> None:
        if self.temporary_identity:
            shutil.rmtree(Path(self.identity_path).parent, ignore_errors=True)


def client_tls(swarm_key_path: str, derive: bool, cert: str) -> SwarmTls | None:
    """What a command that dials members (health, eval, experts fetch) trusts when the swarm serves TLS: the
    certificate in `cert`, or the one derived from the swarm key; None for plaintext."""
    if cert:
        try:
            return SwarmTls(Path(cert).read_bytes(), b"")
        except OSError as e:
            raise UsageError(f"cannot read --tls-cert {cert}: {e.strerror}") from None
    if not derive:
        return None
    if not swarm_key_path:
        raise UsageError("--tls derives the certificate from the swarm key: give --swarm-key too (or --tls-cert)")
    try:
        return SwarmTls.derived(load_key_file(swarm_key_path))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _tls(swarm_key: bytes | None, derive: bool, cert: str, key: str) -> SwarmTls | None:
    if bool(cert) != bool(key):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    if cert:
        try:
            return SwarmTls.from_files(cert, key)
        except OSError as e:
            raise UsageError(f"cannot read the TLS certificate or key: {e}") from None
    if derive:
        if swarm_key is None:
            raise UsageError("--tls derives the certificate from the swarm key: give --swarm-key too "
                             "(or --tls-cert and --tls-key)")
        return SwarmTls.derived(swarm_key)
    return None


@contextmanager
def reading_swarm(initial_peers: list[str], swarm_key: str) -> Iterator[tuple["DHT", NodeTrust]]:
    """A client-mode DHT for commands that only read the swarm (status, experts list/fetch). Like a node, it
    checks every record's signature and, in a private swarm, its MAC; it is shut down on leaving."""
    from hivemind.dht import DHT

    trust = NodeTrust.create("", swarm_key)
    try:
        try:
            dht = DHT(initial_peers=initial_peers, client_mode=True, start=True, **trust.dht_kwargs())
        except Exception as e:
            raise UsageError(f"could not reach the swarm through {' '.join(initial_peers)}: {e}") from None
        try:
            yield dht, trust
        finally:
            dht.shutdown()
    finally:
        trust.close()
