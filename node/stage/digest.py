"""The digest replicas compare: equal digests mean bit-identical tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the tensors' bytes, in order (16 hex digits)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
