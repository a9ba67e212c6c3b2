"""Training text: local files, HF datasets, the offline default corpus, and microbatch sampling."""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.tokenizer import Tokenizer


def read_text_file(path: str | Path, text_field: str = "text") -> str:
    """A .jsonl file contributes each record's `text_field`; any other file is read as UTF-8 text."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
        texts.append(record[text_field])
    return "\n\n".join(texts)


def load_hf_dataset(spec: str, split: str = "train", text_field: str = "text", max_records: int | None = None) -> str:
    """`NAME[:CONFIG]` through HF `datasets` (needs internet unless cached, or a local dataset directory)."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError("--dataset needs the 'datasets' package: pip install 'swarm-node[data]'") from e
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise ValueError(f"--dataset {spec}: {e}") from e
    if text_field not in ds.column_names:
        raise ValueError(f"--dataset {spec}: no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    if max_records is not None:
        ds = ds.select(range(min(max_records, len(ds))))
    return "\n\n".join(ds[text_field])


def default_corpus(max_bytes: int = 2_000_000) -> str:
    """The offline default: the Python standard library's own top-level modules, which every install has.

    Files are taken in sorted order, so every node builds the same corpus.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return "\n\n".join(parts)


@dataclass
class TokenStream:
    """A 1-D token tensor that microbatches are cut from."""

    tokens: torch.Tensor  # int64, shape [n]

    @classmethod
    def from_text(cls, text: str, tokenizer: Tokenizer) -> "TokenStream":
        return cls(torch.tensor(tokenizer.encode(text), dtype=torch.long))

    def __len__(self) -> int:
        return self.tokens.numel()

    def split(self, fractions: tuple[float, ...]) -> list["TokenStream"]:
        """Contiguous splits, e.g. (0.9, 0.05, 0.05) for train, dev and test."""
        bounds, start = [], 0
        for i, f in enumerate(fractions):
            end = len(self) if i == len(fractions) - 1 else start + int(len(self) * f)
            bounds.append(TokenStream(self.tokens[start:end]))
            start = end
        return bounds

    def shard(self, index: int, count: int) -> "TokenStream":
        """Data node `index` of `count` trains on its own contiguous shard."""
        size = len(self) // count
        return TokenStream(self.tokens[index * size:(index + 1) * size])

    def sample(self, generator: torch.Generator, batch_size: int, seq_len: int) -> torch.Tensor:
        """`batch_size` random windows of `seq_len` tokens, shape [batch_size, seq_len]."""
        if len(self) <= seq_len:
            raise ValueError(f"corpus has {len(self)} tokens, fewer than one sequence of {seq_len}; "
                             f"give more data or a smaller --seq-len")
        starts = torch.randint(0, len(self) - seq_len, (batch_size,), generator=generator)
        return torch.stack([self.tokens[s:s + seq_len] for s in starts.tolist()])

    def windows(self, seq_len: int, limit: int | None = None) -> torch.Tensor:
        """Non-overlapping windows in order, for evaluation: shape [n, seq_len]."""
        n = len(self) // seq_len
        if limit is not None:
            n = min(n, limit)
        return self.tokens[: n * seq_len].view(n, seq_len)


def load_corpus(data: list[str] | None, dataset: str | None, tokenizer: Tokenizer,
                text_field: str = "text") -> TokenStream:
    """`--data PATH...` or `--dataset NAME[:config]`, else the offline default corpus."""
    if data and dataset:
        raise ValueError("give either --data or --dataset, not both")
    if data:
        text = "\n\n".join(read_text_file(p, text_field) for p in data)
    elif dataset:
        text = load_hf_dataset(dataset, text_field=text_field)
    else:
        text = default_corpus()
    return TokenStream.from_text(text, tokenizer)
