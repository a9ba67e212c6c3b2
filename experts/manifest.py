"""The expert manifest: everything a peer needs to trust and use a checkpoint, as a plain dict.

Only str, int, float, bool, None, list and dict appear, so it serialises as JSON or msgpack
(for DHT publishing). `weights_sha256` is the hash of the model.safetensors file bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

FORMAT = "swarm-node/expert-v1"


class ChecksumError(ValueError):
    """The weights on disk are not the weights the manifest describes."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_open_file(f)


def sha256_open_file(f) -> str:
    """The sha256 of an open binary file from its start (a server hashes exactly the inode it streams)."""
    digest = hashlib.sha256()
    f.seek(0)
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    name: str
    domain: str  # "*" for the shared seed model, trained on every training domain
    config: dict  # LlamaConfig as a dict
    tokenizer: str
    seed_hash: str  # weights_sha256 of the shared seed this expert branched from ("" for the seed itself)
    parent: str | None  # weights_sha256 of the checkpoint this one was initialised from
    lineage: list[str]  # ancestors' weights_sha256, oldest first
    steps: int
    target_steps: int
    tokens: int
    flops: float
    val_ppl: float | None
    weights_sha256: str
    extra: dict = field(default_factory=dict)  # method, branching, training hyper-parameters
    format: str = FORMAT

    @property
    def complete(self) -> bool:
        return self.steps >= self.target_steps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not an expert manifest (format {found!r}, expected {FORMAT!r})")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"extra"})
        if missing:
            raise ValueError(f"expert manifest lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})
