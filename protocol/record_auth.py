"""Who may write a DHT record, and how readers know: record validators plugged into hivemind's DHT.

- Owned records, in every swarm. A node's records sit under a subkey that names its public key
  (`[owner:ssh-rsa ...]`, hivemind's `RSASignatureValidator`) and are signed with it, so no other peer
  can write or overwrite them. The key is the node's libp2p identity, so the subkey also proves the
  peer id (`owner_peer_id`): a record cannot claim another node's peer id.
- Private swarms add `SwarmKeyValidator`: every record carries a MAC under the swarm key, and a DHT
  node refuses to store, and drops on fetch, any record without a valid one.

Validators run inside the DHT's process (hivemind forks it), so refusals are counted in shared
memory (`RefusalCounter`) that the node's metrics read.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import multiprocessing as mp
import re
import tempfile
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")


class RefusalCounter:
    """A count shared between the DHT process (which refuses records) and the node (which exports it)."""

    def __init__(self) -> None:
        self._value = mp.get_context("fork").Value("q", 0)

    def add(self) -> None:
        with self._value.get_lock():
            self._value.value += 1

    @property
    def value(self) -> int:
        return self._value.value


class OwnedRecordValidator(RSASignatureValidator):
    """hivemind's owner signatures, counting the records it refuses."""

    def __init__(self, private_key: RSAPrivateKey, refused: RefusalCounter):
        super().__init__(private_key)
        self.refused = refused

    def validate(self, record: DHTRecord) -> bool:
        ok = super().validate(record)
        if not ok:
            self.refused.add()
        return ok


class SwarmKeyValidator(RecordValidatorBase):
    """Every record carries `[mac:...]`, an HMAC-SHA256 under the swarm key of its key, subkey, value and expiry."""

    _MAC_RE = re.compile(rb"\[mac:([0-9a-f]{64})\]$")

    def __init__(self, swarm_key: bytes, refused: RefusalCounter):
        self._key = swarm_key
        self.refused = refused

    def _mac(self, record: DHTRecord) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (b"swarm-node record v1", record.key, record.subkey, record.value,
                     repr(float(record.expiration_time)).encode()):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return mac.hexdigest().encode()

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + b"[mac:" + self._mac(record) + b"]"

    def strip_value(self, record: DHTRecord) -> bytes:
        return self._MAC_RE.sub(b"", record.value)

    def validate(self, record: DHTRecord) -> bool:
        found = self._MAC_RE.search(record.value)
        ok = found is not None and hmac.compare_digest(
            found.group(1), self._mac(DHTRecord(record.key, record.subkey, record.value[:found.start()],
                                                record.expiration_time)))
        if not ok:
            self.refused.add()
        return ok

    @property
    def priority(self) -> int:
        # Signed before the owner signature (which then covers the MAC), checked after it.
        return 5

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def load_identity(identity_path: str | None) -> tuple[str, RSAPrivateKey, bool]:
    """The libp2p identity file to start the DHT with, its RSA key, and whether it is a temporary one.

    Without a path, a fresh identity goes into a temp dir that the caller removes at shutdown.
    """
    temporary = not identity_path
    if temporary:
        identity_path = str(Path(tempfile.mkdtemp(prefix="swarm-node-id-")) / "identity.key")
    if not Path(identity_path).exists():
        P2P.generate_identity(identity_path)
    data = crypto_pb2.PrivateKey.FromString(Path(identity_path).read_bytes())
    if data.key_type != crypto_pb2.KeyType.RSA:
        raise ValueError(f"identity {identity_path} is not an RSA key; records are signed with RSA identities")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = serialization.load_der_private_key(data.data, password=None)
    return identity_path, key, temporary


def record_validators(private_key: RSAPrivateKey, swarm_key: bytes | None,
                      refused: RefusalCounter) -> list[RecordValidatorBase]:
    """The validators every DHT of a swarm runs: owner signatures always, the swarm-key MAC in private swarms."""
    validators: list[RecordValidatorBase] = [OwnedRecordValidator(private_key, refused)]
    if swarm_key is not None:
        validators.append(SwarmKeyValidator(swarm_key, refused))
    return validators


@functools.lru_cache(maxsize=4096)
def peer_id_of_key(public_key: bytes) -> str | None:
    """The peer id of an RSA public key (OpenSSH encoding, as hivemind writes it), or None if it is none."""
    try:
        public = RSAPublicKey.from_bytes(public_key)._public_key
    except Exception:  # not a key at all
        return None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    # Peer ids are sha2-256 multihashes of the serialised public key (libp2p's peer-id spec).
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))).to_base58()


def split_owned(subkey) -> tuple[str, str | None]:
    """(the name before the owner marker, the peer id the marker proves, or None) of an owned subkey."""
    raw = subkey if isinstance(subkey, bytes) else str(subkey).encode()
    return raw.split(b"[owner:", 1)[0].decode(errors="replace"), owner_peer_id(raw)


def owner_peer_id(subkey) -> str | None:
    """The peer id proven by an owner subkey (`[owner:<public key>]`), or None if the subkey names no owner."""
    raw = subkey if isinstance(subkey, bytes) else str(subkey).encode()
    found = _OWNER_RE.findall(raw)
    if len(found) != 1:
        return None
    return peer_id_of_key(found[0])
