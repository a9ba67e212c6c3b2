"""TLS for the gRPC data plane: one certificate for the whole swarm, given as files or derived from the swarm key.

Every node serves with the same certificate and trusts exactly it, so a node dials any member by its
plain `host:port` (the name checked is `SWARM_TLS_NAME`, not the address). Deriving the key pair from
the swarm key (HKDF) means a private swarm needs no second secret: holders of the swarm key make the
same key pair, and their self-signed certificates verify one another.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

SWARM_TLS_NAME = "swarm-node"
_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(2124, 1, 1, tzinfo=datetime.timezone.utc)


@dataclass(frozen=True)
class SwarmTls:
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path) -> "SwarmTls":
        return cls(Path(cert).read_bytes(), Path(key).read_bytes())

    @classmethod
    def derived(cls, swarm_key: bytes) -> "SwarmTls":
        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"swarm-node tls v1").derive(swarm_key)
        private = ec.derive_private_key(int.from_bytes(seed, "big") % _P256_ORDER or 1, ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SWARM_TLS_NAME)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                .serial_number(1).not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(SWARM_TLS_NAME)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(private, hashes.SHA256(), ecdsa_deterministic=True))  # RFC 6979: every holder makes the same
        key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        return cls(cert.public_bytes(serialization.Encoding.PEM), key_pem)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.cert_pem)

    @staticmethod
    def channel_options() -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", SWARM_TLS_NAME)]


_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
