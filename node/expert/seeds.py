"""Where an expert's weights start: the catalogue's seed expert, the pipeline's current weights, or the
preset's seeded init, in that order (docs/experts.md, "Seed")."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from node.config import NodeConfig
from node.expert.directory import ExpertDirectory
from node.expert.service import FetchError, download_any
from node.host.host import HostServices
from node.model import ModelSetup
from protocol.records import SEED_DOMAIN, CatalogueEntry, ExpertRecord

log = logging.getLogger(__name__)


class SeedUnavailable(Exception):
    """The catalogue names a seed that no member serves with the catalogue's bytes (yet)."""


class SeedSource:
    def __init__(self, config: NodeConfig, services: HostServices, model: ModelSetup, directory: ExpertDirectory,
                 root: Path):
        """`root`: where fetched seed experts are kept."""
        self.config = config
        self.settings = config.experts
        self.services = services
        self.swarm = config.swarm.id
        self.tokenizer = model.tokenizer
        self.model_config = model.spec.config
        self.directory = directory
        self.root = root

    def seed(self, entry: CatalogueEntry):
        """The model an expert branches from: the catalogue's seed (SeedUnavailable while no member serves it with
        the catalogue's bytes), else the pipeline's weights, or the preset's init."""
        from experts.checkpoint import new_model
        from experts.run import describe_seed

        if entry.seed:
            copies = []
            for record in self.directory.experts([SEED_DOMAIN]):
                if record.id != entry.seed:
                    continue
                if record.sha256 != entry.seed_sha256:  # the id's 12 hex digits matched, the weights do not
                    log.warning("refusing seed %s of %s: weights %s..., the catalogue's are %s...", record.id,
                                record.peer_id[-8:], record.sha256[:12], entry.seed_sha256[:12])
                    self.directory.on_refused("seed")
                    continue
                copies.append(record)
            try:
                return self._fetched(entry, copies)
            except (FetchError, ValueError) as e:
                # Never branch from other weights than the ones the catalogue names: wait for a member to serve them.
                raise SeedUnavailable(f"the catalogue's seed {entry.seed} is not available yet ({e}); expert "
                                      f"training waits for it") from None
        gathered = self._gather_pipeline()
        if gathered is not None:
            model, round_ = gathered
            return model, describe_seed(model, f"pipeline-round-{round_}", self.tokenizer.name,
                                        f"pipeline weights after round {round_}")
        model = new_model(self.model_config, self.config.model.seed)
        return model, describe_seed(model, "init", self.tokenizer.name, f"seeded init (seed {self.config.model.seed})")

    def _fetched(self, entry: CatalogueEntry, copies: list[ExpertRecord]):
        """The catalogue's seed, downloaded once from the first copy whose bytes hash to the catalogue's sha256
        and verified again on every load."""
        from experts.checkpoint import load_expert

        path = self.root / entry.seed
        if not (path / "manifest.json").is_file():
            path, _ = download_any(copies, self.swarm, self.root, on_wrong_bytes=self._refuse_bytes,
                                   timeout=self.settings.fetch_timeout, attempts=self.settings.fetch_attempts,
                                   auth=self.services.trust.auth, tls=self.services.trust.tls,
                                   meter=self.services.metrics.count_frame)
        model, manifest = load_expert(path)  # verifies the sha256 of the file against its manifest
        if manifest.weights_sha256 != entry.seed_sha256:
            raise ValueError(f"the copy in {path} has weights {manifest.weights_sha256[:12]}..., "
                             f"not {entry.seed_sha256[:12]}...")
        manifest.extra = {**manifest.extra, "source": f"catalogue seed {entry.seed}"}
        return model, manifest

    def _refuse_bytes(self, reason: str) -> None:
        log.warning("refusing a copy of the catalogue's seed: %s", reason)
        self.directory.on_refused("weights")

    def _gather_pipeline(self):
        """Every stage's parameters from a serving replica, as one LlamaForCausalLM; None without a full pipeline."""
        import torch

        members = self.services.directory.members()
        state, rounds = {}, []
        for stage in range(self.config.model.num_stages):
            sources = sorted(p for p, r in members.items() if r.serving and stage in r.stages and r.round > 0)
            for peer in sources:
                try:
                    completed, tensors, _ = self.services.clients.fetch_state(members[peer].endpoint, self.swarm, stage,
                                                                     receiver=peer,
                                                                     timeout=self.config.lifecycle.state_transfer_timeout)
                except grpc.RpcError as e:
                    log.info("could not fetch stage %d from %s: %s", stage, peer[-8:], e.details())
                    continue
                for key, tensor in tensors.items():
                    if key.startswith("param/"):
                        name = key[len("param/"):]
                        state[name if name.startswith("lm_head.") else f"model.{name}"] = tensor
                rounds.append(completed)
                break
            else:
                return None
        model = model_of(self.model_config)
        try:
            with torch.no_grad():
                model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            log.warning("pipeline weights do not fit one model (%s); using the seeded init", str(e).splitlines()[0])
            return None
        return model, min(rounds)


def model_of(config):
    """A LlamaForCausalLM of `config` (an LlamaConfig or its dict), randomly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(config, dict):
        config = LlamaConfig.from_dict(config)
    return LlamaForCausalLM(config)
