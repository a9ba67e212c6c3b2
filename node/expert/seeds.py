"""Where an expert's weights start: the catalogue's seed expert, the pipeline's current weights, or the
preset's seeded init, in that order (docs/experts.md, "Seed")."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from node.config import NodeConfig
from node.expert.directory import ExpertDirectory
from node.expert.service import FetchError, download_expert
from node.host.host import HostServices
from node.model import ModelSetup
from protocol.records import CatalogueEntry

log = logging.getLogger(__name__)


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
        """The model an expert branches from: the catalogue's seed, the pipeline's weights, or the preset's init."""
        from experts.checkpoint import load_expert, new_model
        from experts.run import describe_seed

        if entry.seed:
            found = [r for r in self.directory.experts(["*"]) if r.id == entry.seed]
            for record in found:
                try:
                    path = self.root / record.id
                    if not (path / "manifest.json").is_file():
                        path = download_expert(record, self.swarm, self.root,
                                               timeout=self.settings.fetch_timeout,
                                               attempts=self.settings.fetch_attempts, auth=self.services.trust.auth,
                                               tls=self.services.trust.tls)
                    model, manifest = load_expert(path)  # verifies the sha256 again
                    manifest.extra = {**manifest.extra, "source": f"catalogue seed {record.id}"}
                    return model, manifest
                except (FetchError, ValueError) as e:
                    log.warning("could not fetch the catalogue's seed %s: %s", entry.seed, e)
            log.warning("the catalogue's seed %s is not available; falling back", entry.seed)
        gathered = self._gather_pipeline()
        if gathered is not None:
            model, round_ = gathered
            return model, describe_seed(model, f"pipeline-round-{round_}", self.tokenizer.name,
                                        f"pipeline weights after round {round_}")
        model = new_model(self.model_config, self.config.model.seed)
        return model, describe_seed(model, "init", self.tokenizer.name, f"seeded init (seed {self.config.model.seed})")

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
