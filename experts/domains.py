"""Domains: named corpora with train/dev/test splits and a measured difficulty.

Difficulty is a compression rate in bits per byte: zlib (level 9) applied to independent 4 KiB chunks.
Text that a compressor cannot squeeze from local context is, to first order, text a short-context LM
also finds hard. Chunking matters: a whole-corpus compressor (LZMA's 8 MiB window) rewards boilerplate
repeated across files (changelog trailers, licence headers), which a 128-token context never sees.
The measure is cheap, model-free and deterministic, so every node ranks the domains the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lm.data import TokenStream, load_hf_dataset, read_text_file
from lm.tokenizer import Tokenizer

SPLITS = (0.9, 0.05, 0.05)
DIFFICULTY_SAMPLE_BYTES = 256_000  # enough for a stable ratio, fast enough to measure on every run
DIFFICULTY_CHUNK = 4096


def difficulty(text: str) -> float:
    """zlib bits per byte over independent 4 KiB chunks of (a prefix of) the text; higher means harder."""
    raw = text.encode("utf-8")[:DIFFICULTY_SAMPLE_BYTES]
    if not raw:
        raise ValueError("cannot measure the difficulty of an empty domain")
    chunks = [raw[i:i + DIFFICULTY_CHUNK] for i in range(0, len(raw), DIFFICULTY_CHUNK)]
    return 8 * sum(len(zlib.compress(c, 9)) for c in chunks) / len(raw)


@dataclass
class Domain:
    name: str
    source: str
    held_out: bool  # never trained on; only scored
    difficulty: float
    train: TokenStream
    dev: TokenStream
    test: TokenStream

    @property
    def tokens(self) -> int:
        return len(self.train) + len(self.dev) + len(self.test)

    @property
    def sha256(self) -> str:
        """Of the tokens: system sources (dpkg status, /usr/share/doc) change when packages are installed,
        so nodes and reruns compare this before trusting that they hold the same domain."""
        digest = hashlib.sha256()
        for split in (self.train, self.dev, self.test):
            digest.update(split.tokens.numpy().tobytes())
        return digest.hexdigest()

    def summary(self) -> dict:
        return {"name": self.name, "source": self.source, "held_out": self.held_out, "sha256": self.sha256,
                "difficulty_bpb": round(self.difficulty, 4), "tokens": self.tokens,
                "train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


def make_domain(name: str, source: str, text: str, tokenizer: Tokenizer, held_out: bool = False) -> Domain:
    if not text:
        raise ValueError(f"domain {name}: {source} has no text")
    train, dev, test = TokenStream.from_text(text, tokenizer).split(SPLITS)
    return Domain(name, source, held_out, difficulty(text), train, dev, test)


class Domains:
    """The registry: training domains (ranked by difficulty when sizing) and held-out domains."""

    def __init__(self, domains: list[Domain]):
        names = [d.name for d in domains]
        if len(set(names)) != len(names):
            raise ValueError(f"domain names must be unique: {', '.join(names)}")
        self.all = domains

    @property
    def trained(self) -> list[Domain]:
        return [d for d in self.all if not d.held_out]

    @property
    def held_out(self) -> list[Domain]:
        return [d for d in self.all if d.held_out]

    def get(self, name: str) -> Domain:
        for d in self.all:
            if d.name == name:
                return d
        raise ValueError(f"no domain {name!r}; known: {', '.join(d.name for d in self.all)}")

    def table(self) -> str:
        lines = [f"{'domain':<14} {'kind':<9} {'difficulty (bpb)':>16} {'tokens':>9}  source"]
        for d in self.all:
            kind = "held-out" if d.held_out else "train"
            lines.append(f"{d.name:<14} {kind:<9} {d.difficulty:>16.3f} {d.tokens:>9}  {d.source}")
        return "\n".join(lines)


def parse_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH` (text or jsonl file) or `NAME=hf:DATASET[:CONFIG]`."""
    name, sep, where = spec.partition("=")
    if not sep or not name or not where:
        raise ValueError(f"domain {spec!r}: expected NAME=PATH or NAME=hf:DATASET[:CONFIG]")
    return name, where


def load_text(where: str, max_bytes: int, text_field: str = "text") -> str:
    if where.startswith("hf:"):
        text = load_hf_dataset(where[3:], text_field=text_field)
    else:
        text = read_text_file(where, text_field)
    return _cap(text, max_bytes)


def _cap(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def _join_files(paths: Iterable[Path], max_bytes: int, files_at_least: int = 16) -> str:
    """Files in sorted order, each capped so that at least `files_at_least` files share the budget."""
    per_file, parts, total = max(1, max_bytes // files_at_least), [], 0
    for path in sorted(p for p in paths if p.is_file() and not p.is_symlink()):
        part = _cap(_read(path), per_file)
        parts.append(part)
        total += len(part) + 2
        if total >= max_bytes:
            break
    return _cap("\n\n".join(parts), max_bytes)


def _pydoc_topics(max_bytes: int) -> str:
    from pydoc_data.topics import topics

    return _cap("\n\n".join(topics[k] for k in sorted(topics)), max_bytes)


def default_sources(max_bytes: int) -> list[tuple[str, str, bool, str]]:
    """(name, source, held_out, text) for the offline corpus; all of it ships with Debian and CPython."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    include = Path(sysconfig.get_paths()["include"])
    doc = Path("/usr/share/doc")
    perl = [p for root in sorted(Path("/usr/lib").glob("*/perl-base")) for p in root.rglob("*.pm")]
    return [
        ("python", f"{stdlib}/*.py", False, _join_files(stdlib.glob("*.py"), max_bytes)),
        ("prose", "pydoc_data.topics", False, _pydoc_topics(max_bytes)),
        ("c-headers", f"{include}/**/*.h", False, _join_files(include.rglob("*.h"), max_bytes)),
        ("licenses", "/usr/share/common-licenses/*", False,
         _join_files(Path("/usr/share/common-licenses").glob("*"), max_bytes)),
        ("changelogs", "/usr/share/doc/*/changelog.Debian.gz", False,
         _join_files(doc.glob("*/changelog.Debian.gz"), max_bytes)),
        ("dpkg-status", "/var/lib/dpkg/status", False,
         _join_files([Path("/var/lib/dpkg/status")], max_bytes, files_at_least=1)),
        ("perl", "/usr/lib/*/perl-base/**/*.pm", True, _join_files(perl, max_bytes)),
        ("copyright", "/usr/share/doc/*/copyright", True, _join_files(doc.glob("*/copyright"), max_bytes)),
    ]


def default_domains(tokenizer: Tokenizer, max_bytes: int = 400_000) -> tuple[Domains, list[str]]:
    """The offline corpus, and the names of sources this host lacks (they are skipped)."""
    domains, missing = [], []
    for name, source, held_out, text in default_sources(max_bytes):
        if text.strip():
            domains.append(make_domain(name, source, text, tokenizer, held_out))
        else:
            missing.append(f"{name} ({source})")
    return Domains(domains), missing


def domains_from_specs(specs: list[str], held_out_specs: list[str], tokenizer: Tokenizer,
                       max_bytes: int = 400_000, text_field: str = "text") -> Domains:
    domains = []
    for spec_list, held_out in ((specs, False), (held_out_specs, True)):
        for spec in spec_list:
            name, where = parse_spec(spec)
            domains.append(make_domain(name, where, load_text(where, max_bytes, text_field), tokenizer, held_out))
    return Domains(domains)
