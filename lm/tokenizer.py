"""Tokenizers: an offline byte-level default, or any HF tokenizer directory."""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS, EOS and PAD. Needs no download and never fails to encode."""

    name = "bytes-v1"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps `transformers.AutoTokenizer` loaded from a local directory."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        self.name = f"hf:{path}"
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id if self._tok.eos_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(path: str | None) -> Tokenizer:
    """`None` gives the byte tokenizer; otherwise an HF tokenizer directory."""
    if path is None:
        return ByteTokenizer()
    try:
        return HFTokenizer(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {path}: cannot load an HF tokenizer from it ({e.__class__.__name__})") from e
