"""Stage checkpoints on local disk: parameters, AdamW state and round, written atomically and verified on read.

Layout under --checkpoint-dir:

    stage-<s>/round-<r>/state.safetensors   parameters and optimizer moments (StageTrainer.export)
    stage-<s>/round-<r>/manifest.json       {"stage", "round", "files": {name: sha256}, "created"}

A checkpoint is written into a temporary directory and renamed into place, so a crash leaves either the
whole checkpoint or none. A checkpoint whose files do not match their manifest's sha256 is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from node.stage.trainer import StageTrainer

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
MANIFEST = "manifest.json"


class StageCheckpoints:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.root = Path(directory)
        self.keep = keep  # checkpoints kept per stage: the newest, and one in case it is being read

    def save(self, trainer: StageTrainer) -> Path:
        tensors, metadata = trainer.export(include_residual=True)
        round_ = int(metadata["completed_round"])
        stage_dir = self.root / f"stage-{trainer.stage}"
        final = stage_dir / f"round-{round_:08d}"
        tmp = stage_dir / f".round-{round_:08d}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = tmp / STATE_FILE
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(state),
                  metadata=metadata)
        manifest = {"stage": trainer.stage, "round": round_, "files": {STATE_FILE: _sha256(state)},
                    "created": time.time()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for path in (state, tmp / MANIFEST):
            with path.open("rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(stage_dir)
        for old in sorted(stage_dir.glob("round-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def stages(self) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in self.root.glob("stage-*") if p.name.split("-")[1].isdigit())

    def state(self, stage: int) -> tuple[int, dict[str, torch.Tensor], dict[str, str]] | None:
        """(round, tensors, metadata) of the newest intact checkpoint of `stage`, or None: what FetchState serves
        of a stage this node no longer hosts."""
        saved = self.latest(stage)
        return None if saved is None else saved[:3]

    def latest(self, stage: int) -> tuple[int, dict[str, torch.Tensor], dict[str, str], Path] | None:
        """The newest intact checkpoint of `stage`: (round, tensors, metadata, directory)."""
        for directory in sorted((self.root / f"stage-{stage}").glob("round-*"), reverse=True):
            try:
                manifest = json.loads((directory / MANIFEST).read_text())
                for name, digest in manifest["files"].items():
                    if _sha256(directory / name) != digest:
                        raise ValueError(f"{name} does not match its sha256")
                tensors = load_file(str(directory / STATE_FILE))
                with (directory / STATE_FILE).open("rb") as f:
                    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
                metadata = header.get("__metadata__", {})
                return int(manifest["round"]), tensors, metadata, directory
            except (OSError, ValueError, KeyError) as e:
                log.warning("skipping checkpoint %s: %s", directory, e)
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
