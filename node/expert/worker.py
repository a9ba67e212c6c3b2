"""The expert role: train HDEE domain experts from the swarm's catalogue, publish them, serve their weights.

- The catalogue (`<swarm>/experts`) names the domains: source, sha256 of the tokens, size, difficulty, and the
  seed to branch from. The node that starts the swarm owns it: it signs it from `--domain NAME=PATH` (or the
  offline corpus) and `--expert-seed`; the others read it and never store it. A node trains only domains whose
  bytes it holds (equal sha256).
- A job is one expert: the domain furthest behind its share of the swarm's expert FLOPs, sized by
  `--expert-policy`, branched from a seed (the catalogue's seed expert, else the pipeline's current weights,
  else the preset's seeded init), trained with checkpoints under `--expert-dir/<swarm>/<peer id>/<id>/`.
  A restarted node resumes an unfinished job at its last checkpoint and serves its finished experts again.
- Every checkpoint is published at `<swarm>/experts/<domain>` (subkey: the expert id) and served by FetchExpert.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from node.config import ExpertConfig, NodeConfig
from node.expert.claims import committed_flops
from node.expert.directory import ExpertDirectory
from node.expert.metrics import ExpertMetrics
from node.expert.seeds import SeedSource, SeedUnavailable, model_of
from node.expert.service import WEIGHTS, ServedExperts
from node.host.host import HostServices
from node.model import ModelSetup
from protocol.records import SEED_DOMAIN, CatalogueEntry, ExpertRecord, seed_id

log = logging.getLogger(__name__)

JOB = "job.json"
DEFAULT_ROOT = Path.home() / ".cache" / "swarm-node" / "experts"  # without --expert-dir


@dataclass
class Job:
    id: str
    domain: str
    method: str
    intermediate_size: int
    steps: int
    planned_flops: float
    seed: int
    seed_manifest: dict  # the manifest of the model it branched from (lineage)


class CatalogueKeeper:
    """Loads this node's domains and reads the swarm's catalogue; the creator owns it and signs it again."""

    def __init__(self, directory: ExpertDirectory, settings: ExpertConfig, tokenizer, creator: bool):
        """`creator`: this node started the swarm; the catalogue is its own domains."""
        self.directory = directory
        self.settings = settings
        self.tokenizer = tokenizer
        self.creator = creator
        self._domains: dict[str, object] = {}
        self._own: dict[str, CatalogueEntry] | None = None

    def local_domain(self, entry: CatalogueEntry):
        """This node's text for a catalogue domain, or None (with a message) when it lacks or differs."""
        from experts.domains import default_sources, domains_from_specs, make_domain, parse_spec

        if entry.name not in self._domains:
            domain = None
            mine = {parse_spec(s)[0]: s for s in self.settings.domains}
            if entry.name in mine:
                domain = domains_from_specs([mine[entry.name]], [], self.tokenizer, self.settings.max_bytes).get(entry.name)
            elif Path(entry.source).is_file():
                domain = domains_from_specs([f"{entry.name}={entry.source}"], [], self.tokenizer,
                                            self.settings.max_bytes).get(entry.name)
            else:
                for name, source, _, text in default_sources(self.settings.max_bytes):
                    if name == entry.name and source == entry.source and text.strip():
                        domain = make_domain(name, source, text, self.tokenizer)
            self._domains[entry.name] = domain
        domain = self._domains[entry.name]
        if domain is None:
            log.warning("domain %s: this node lacks its text (%s); skipping it", entry.name, entry.source)
            return None
        if domain.sha256 != entry.sha256:
            log.warning("domain %s: this node's text (sha256 %s...) differs from the catalogue's (%s...); "
                        "refusing it", entry.name, domain.sha256[:12], entry.sha256[:12])
            return None
        return domain

    def own_entries(self) -> list[CatalogueEntry]:
        """The catalogue this node would start: its --domain files, or the offline corpus's training domains,
        each naming --expert-seed (if given) as the seed to branch from."""
        from experts.domains import default_domains, domains_from_specs

        if self.settings.domains:
            domains = domains_from_specs(self.settings.domains, [], self.tokenizer, self.settings.max_bytes).trained
        else:
            registry, missing = default_domains(self.tokenizer, self.settings.max_bytes)
            if missing:
                log.info("experts: this host lacks %s; not in the catalogue", ", ".join(missing))
            domains = registry.trained
        for d in domains:
            self._domains[d.name] = d
        seed_sha256 = self._seed_sha256()
        seed = seed_id(seed_sha256) if seed_sha256 else ""
        return [CatalogueEntry(d.name, d.source, d.sha256, d.tokens, d.difficulty, seed, seed_sha256)
                for d in domains]

    def _seed_sha256(self) -> str:
        """The weights of --expert-seed, verified against its manifest ("" without one)."""
        from experts.checkpoint import read_manifest, verify

        if not self.settings.seed_dir:
            return ""
        path = Path(self.settings.seed_dir)
        try:
            manifest = read_manifest(path)
            verify(path, manifest)
        except ValueError as e:
            log.error("experts: --expert-seed %s: %s; the catalogue names no seed", path, e)
            return ""
        return manifest.weights_sha256

    def refresh(self) -> dict[str, CatalogueEntry]:
        """The catalogue. The creator signs its own entries again (a fresh expiry, which nobody else can give);
        any other node only reads the owner's entries, and names the owner for nodes that join through it."""
        if self.creator:
            if self._own is None:
                self._own = {e.name: e for e in self.own_entries()}
                log.info("experts: catalogue of %d domains: %s", len(self._own), ", ".join(self._own))
            self.directory.publish_catalogue(self._own.values(), ttl=self.settings.catalogue_ttl)
            return dict(self._own)
        catalogue = self.directory.catalogue()
        if catalogue:
            self.directory.vouch(self.directory.trusted_owner, ttl=self.settings.catalogue_ttl)
        return catalogue


class ExpertWorker:
    """Runs jobs one after another on its own thread until stopped (or until the pipeline needs this node)."""

    def __init__(self, config: NodeConfig, services: HostServices, model: ModelSetup, metrics: ExpertMetrics,
                 directory: ExpertDirectory):
        self.config = config
        self.settings = config.experts
        self.services = services
        self.swarm, self.peer_id, self.endpoint = config.swarm.id, services.peer_id, services.endpoint
        root = Path(self.settings.dir).expanduser() if self.settings.dir else DEFAULT_ROOT
        self.home = root / self.swarm / self.peer_id  # this node's jobs
        self.record_ttl = config.swarm.record_ttl
        self.refresh_s = config.swarm.heartbeat_interval  # expert records are refreshed as often as the node's
        self.device = str(model.device)
        self.directory = directory
        self.metrics = metrics
        self.events = services.events
        self.stop = services.stop
        self.served = ServedExperts()
        self.catalogue = CatalogueKeeper(directory, self.settings, model.tokenizer, creator=config.swarm.new_swarm)
        self.model_config = model.spec.config
        self.seeds = SeedSource(config, services, model, directory, self.home / "seeds")
        self._halt = threading.Event()
        self._jobs: threading.Thread | None = None
        self._threads: list[threading.Thread] = []

    # ---- threads -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._jobs = threading.Thread(target=self._run, name="experts", daemon=True)
        records = threading.Thread(target=self._refresh_loop, name="expert-records", daemon=True)
        self._threads = [self._jobs, records]
        for thread in self._threads:
            thread.start()

    def finish_job(self) -> None:
        """Wait (at most --stop-timeout) for the job loop, which stops at its next step with a checkpoint."""
        if self._jobs is not None:
            self._jobs.join(self.settings.stop_timeout)

    def join(self) -> None:
        self.finish_job()
        for thread in self._threads:
            thread.join(self.config.lifecycle.thread_join_timeout)

    def withdraw_all(self) -> None:
        for record in self.served.records():
            try:
                self.directory.withdraw(record, ttl=self.record_ttl)
            except Exception as e:
                log.debug("could not withdraw expert %s: %r", record.id, e)

    def _refresh_loop(self) -> None:
        while not self.stop.wait(self.refresh_s):
            try:
                self.served.publish_each(lambda record: self.directory.publish(record, ttl=self.record_ttl))
                self.catalogue.refresh()
            except Exception as e:  # the DHT may be shutting down; the next refresh retries
                log.debug("expert record refresh failed: %r", e)

    def halt(self) -> None:
        """Stop training at the next step, with a checkpoint (the node is about to take a stage)."""
        self._halt.set()

    def _halted(self) -> bool:
        return self.stop.is_set() or self._halt.is_set()

    # ---- the job loop --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve_finished()
            if self.settings.seed_dir:
                self._serve_seed(Path(self.settings.seed_dir))
        except Exception as e:  # e.g. a seed whose bytes do not match its manifest: say so, train without it
            log.error("experts: %s", e)
            self.events.emit("expert_failed", reason=repr(e))
        while not self._halted():
            try:
                catalogue = self.catalogue.refresh()
                job = self._unfinished_job(catalogue) or (self._new_job(catalogue) if catalogue else None)
                if job is not None:
                    self._train(job, catalogue)
                    continue
            except SeedUnavailable as e:  # e.g. the member serving it has not started yet: try again later
                log.warning("%s", e)
            except Exception as e:  # an expert failure must not take the node down: say why, retry, keep serving
                log.exception("expert training failed: %r", e)
                self.events.emit("expert_failed", reason=repr(e))
            self.stop.wait(max(self.refresh_s, self.settings.retry_interval))

    def _serve_finished(self) -> None:
        """After a restart: serve and publish the finished experts this node trained before."""
        from experts.checkpoint import read_manifest, verify

        for job_file in sorted(self.home.glob(f"*/{JOB}")):
            job = Job(**json.loads(job_file.read_text()))
            try:
                manifest = read_manifest(job_file.parent)
                verify(job_file.parent, manifest)
            except ValueError as e:
                log.warning("not serving %s: %s", job.id, e)
                continue
            if manifest.complete:
                for stale in job_file.parent.glob("served-*.safetensors"):
                    stale.unlink()
                self._publish(job, manifest)

    def _serve_seed(self, path: Path) -> None:
        """Serve --expert-seed (sha256 verified) as the expert `seed-<sha>` of domain "*" (the creator's catalogue
        names it by its sha256; any node holding the same bytes may serve it)."""
        from experts.checkpoint import read_manifest, verify

        manifest = read_manifest(path)
        verify(path, manifest)
        manifest.domain = SEED_DOMAIN
        record = ExpertRecord(id=seed_id(manifest.weights_sha256), peer_id=self.peer_id,
                              endpoint=self.endpoint, bytes=(path / WEIGHTS).stat().st_size,
                              dev_loss=math.log(manifest.val_ppl) if manifest.val_ppl else None,
                              manifest=manifest.to_dict())
        self.served.serve(record, path, snapshot=False)
        self.directory.publish(record, ttl=self.record_ttl)
        log.info("experts: serving %s as a seed", record.id)

    def _unfinished_job(self, catalogue: dict[str, CatalogueEntry]) -> Job | None:
        """A job of this node that stopped before its last step (a restart, or a stop to take a stage)."""
        from experts.checkpoint import MANIFEST, read_manifest

        for job_file in sorted(self.home.glob(f"*/{JOB}")):
            job = Job(**json.loads(job_file.read_text()))
            if not (job_file.parent / MANIFEST).is_file():  # stopped before its claim was saved: start over
                shutil.rmtree(job_file.parent)
                continue
            if job.domain not in catalogue or read_manifest(job_file.parent).complete:
                continue
            if self.catalogue.local_domain(catalogue[job.domain]) is not None:
                return job
        return None

    def _plan(self, catalogue: dict[str, CatalogueEntry], model_config):
        """This node's HDEE plan over the catalogue's difficulties, for a model of `model_config`."""
        from experts.sizing import POLICIES, make_plan

        data = self.config.data
        return make_plan(POLICIES[self.settings.policy], {n: e.difficulty for n, e in catalogue.items()},
                         model_config, self.settings.medium_steps(), data.batch_size * data.seq_len, data.seq_len)

    def _spent(self, catalogue: dict[str, CatalogueEntry], ignore_fresh_above: str | None,
               claim: str | None) -> dict[str, float]:
        """FLOPs per domain spent or committed by the swarm's experts (an unfinished one counts its plan), each
        bounded by what this node's plan gives its domain (node/expert/claims.py)."""
        limit = {e.domain: e.flops * self.settings.claim_flops_limit
                 for e in self._plan(catalogue, self.model_config).experts}

        def skip(record: ExpertRecord) -> bool:  # our own claim, and one made with ours by a peer that yields to us
            return record.id == claim or (record.steps == 0 and ignore_fresh_above is not None
                                          and record.peer_id > ignore_fresh_above)
        return committed_flops(self.directory.experts(catalogue), limit, set(self.services.directory.members()),
                               self.directory.on_refused, skip)

    def _choose(self, catalogue: dict[str, CatalogueEntry], ignore_fresh_above: str | None = None,
                claim: str | None = None) -> str | None:
        from experts.sizing import choose_domain

        eligible = {name for name, entry in catalogue.items() if self.catalogue.local_domain(entry) is not None}
        difficulties = {name: e.difficulty for name, e in catalogue.items()}
        return choose_domain(difficulties, self._spent(catalogue, ignore_fresh_above, claim), eligible)

    def _new_job(self, catalogue: dict[str, CatalogueEntry]) -> Job | None:
        """Choose, claim (a step-0 record), let simultaneous claims settle, and re-choose if a lower peer id won."""
        from experts.sizing import POLICIES

        for _ in range(self.settings.claim_tries):
            domain = self._choose(catalogue)
            if domain is None:
                return None
            seed_model, seed_manifest = self.seeds.seed(catalogue[domain])
            method = POLICIES[self.settings.policy]
            plan = self._plan(catalogue, seed_model.config)
            ep = next(e for e in plan.experts if e.domain == domain)
            n = len(list(self.home.glob(f"{domain}-*")))
            expert_id = f"{domain}-{self.peer_id[-8:]}-{n}"
            job = Job(expert_id, domain, method, ep.intermediate_size, ep.steps, ep.flops,
                      int(hashlib.sha256(expert_id.encode()).hexdigest()[:8], 16), seed_manifest.to_dict())
            out = self.home / job.id
            out.mkdir(parents=True, exist_ok=True)
            (out / JOB).write_text(json.dumps(asdict(job), indent=1) + "\n")
            self._train(job, catalogue, seed=(seed_model, seed_manifest), claim_only=True)
            if self.stop.wait(self.settings.claim_settle):
                return job
            if self._choose(catalogue, ignore_fresh_above=self.peer_id, claim=job.id) == domain:
                return job
            log.info("experts: another node claimed %s first; choosing again", domain)
            self.served.withdraw(job.id, lambda record: self.directory.withdraw(record, ttl=self.record_ttl))
            for f in sorted(out.iterdir()):
                f.unlink()
            out.rmdir()
        return None

    def _train(self, job: Job, catalogue: dict[str, CatalogueEntry], seed=None, claim_only: bool = False) -> None:
        from experts.manifest import Manifest
        from experts.run import ExpertSettings, can_resume, train_expert
        from experts.sizing import ExpertPlan
        from experts.train import TrainHooks

        domain = self.catalogue.local_domain(catalogue[job.domain])
        seed_manifest = Manifest.from_dict(job.seed_manifest)
        if seed is None:  # resuming: the checkpoint holds the weights; the seed only gives the shapes
            seed = (model_of(seed_manifest.config), seed_manifest)
        from experts.checkpoint import read_manifest

        out = self.home / job.id
        resumed = can_resume(out) and read_manifest(out).steps > 0
        settings = ExpertSettings(batch_size=self.config.data.batch_size, seq_len=self.config.data.seq_len, lr=self.config.training.lr,
                                  save_every=self.settings.save_every, device=self.device, dtype=self.config.model.dtype)
        plan = ExpertPlan(job.domain, catalogue[job.domain].difficulty, job.intermediate_size, job.steps,
                          job.planned_flops)

        def on_step(step: int, loss: float) -> None:
            self.metrics.train_loss.labels(domain=job.domain).set(loss)
            self.metrics.steps.inc()

        hooks = TrainHooks(should_stop=self._halted, on_step=on_step,
                           on_checkpoint=lambda manifest: self._publish(job, manifest))
        if not claim_only:
            self.events.emit("expert_started", id=job.id, domain=job.domain, resumed=resumed,
                             steps=job.steps, seed_source=seed_manifest.extra.get("source", seed_manifest.name))
            log.info("expert %s: %s on %s (%d steps, MLP width %d)", job.id, "resuming" if resumed else "training",
                     job.domain, job.steps, job.intermediate_size)
        result = train_expert(seed[0], seed[1], domain, plan, job.id, settings, out, job.seed,
                              {"method": job.method, "planned_flops": job.planned_flops}, resume=True, hooks=hooks,
                              stop_at=0 if claim_only else None, progress=False)
        if not claim_only:
            m = result.manifest
            self.events.emit("expert_stopped", id=job.id, domain=job.domain, steps=m.steps, target_steps=m.target_steps,
                             start_step=result.start_step, val_ppl=m.val_ppl, sha256=m.weights_sha256)

    def _publish(self, job: Job, manifest) -> None:
        out = self.home / job.id
        record = ExpertRecord(id=job.id, peer_id=self.peer_id, endpoint=self.endpoint,
                              bytes=(out / WEIGHTS).stat().st_size,
                              dev_loss=math.log(manifest.val_ppl) if manifest.val_ppl else None,
                              manifest=manifest.to_dict())
        self.served.serve(record, out)
        self.directory.publish(record, ttl=self.record_ttl)
        self.metrics.published.inc()
        self.events.emit("expert_published", id=job.id, domain=job.domain, steps=manifest.steps,
                         target_steps=manifest.target_steps, sha256=manifest.weights_sha256)
