"""The expert role: train HDEE domain experts from the swarm's catalogue, publish them, serve their weights.

- The catalogue (`<swarm>/experts`) names the domains: source, sha256 of the tokens, size, difficulty. The
  node that starts the swarm publishes it from `--domain NAME=PATH` (or the offline corpus); every expert
  node keeps it alive. A node trains only domains whose bytes it holds (equal sha256).
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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from node.control.discovery import SwarmDirectory
from node.events import EventLog
from node.expert.directory import ExpertDirectory
from node.expert.metrics import ExpertMetrics
from node.expert.service import WEIGHTS, FetchError, ServedExperts, download_expert
from node.roles import stage_in_need
from node.dataplane.transport import StageClients
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.limits import WireLimits
from protocol.records import CatalogueEntry, ExpertRecord, NodeRecord, NodeState

log = logging.getLogger(__name__)

JOB = "job.json"
CLAIM_SETTLE_S = 2.0  # how long a fresh claim waits for other nodes' claims to reach the DHT


@dataclass
class ExpertOptions:
    """The node settings the expert role reads (see node/config.py for each flag)."""

    swarm: str
    peer_id: str
    endpoint: str
    home: Path  # this node's jobs: --expert-dir/<swarm>/<peer id>
    domains: list[str]  # --domain NAME=PATH
    max_bytes: int
    policy: str
    medium_steps: int
    save_every: int
    batch_size: int
    seq_len: int
    lr: float
    device: str
    dtype: str
    seed: int
    num_stages: int
    min_replicas: int
    watch_pipeline: bool  # --role auto: stop at a checkpoint when a stage runs short
    creator: bool  # started the swarm: publishes the catalogue
    record_ttl: float
    refresh_s: float
    seed_dir: str = ""  # --expert-seed: an expert checkpoint this node serves as the catalogue's seed


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
    """Loads this node's domains and keeps the swarm's catalogue alive (publishing it if this node is the creator)."""

    def __init__(self, directory: ExpertDirectory, opts: ExpertOptions, tokenizer):
        self.directory = directory
        self.opts = opts
        self.tokenizer = tokenizer
        self._domains: dict[str, object] = {}
        self.seed_id = ""  # set once this node serves the catalogue's seed (--expert-seed)

    def local_domain(self, entry: CatalogueEntry):
        """This node's text for a catalogue domain, or None (with a message) when it lacks or differs."""
        from experts.domains import default_sources, domains_from_specs, make_domain, parse_spec

        if entry.name not in self._domains:
            domain = None
            mine = {parse_spec(s)[0]: s for s in self.opts.domains}
            if entry.name in mine:
                domain = domains_from_specs([mine[entry.name]], [], self.tokenizer, self.opts.max_bytes).get(entry.name)
            elif Path(entry.source).is_file():
                domain = domains_from_specs([f"{entry.name}={entry.source}"], [], self.tokenizer,
                                            self.opts.max_bytes).get(entry.name)
            else:
                for name, source, _, text in default_sources(self.opts.max_bytes):
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
        """The catalogue this node would start: its --domain files, or the offline corpus's training domains."""
        from experts.domains import default_domains, domains_from_specs

        if self.opts.domains:
            domains = domains_from_specs(self.opts.domains, [], self.tokenizer, self.opts.max_bytes).trained
        else:
            registry, missing = default_domains(self.tokenizer, self.opts.max_bytes)
            if missing:
                log.info("experts: this host lacks %s; not in the catalogue", ", ".join(missing))
            domains = registry.trained
        for d in domains:
            self._domains[d.name] = d
        return [CatalogueEntry(d.name, d.source, d.sha256, d.tokens, d.difficulty) for d in domains]

    def refresh(self) -> dict[str, CatalogueEntry]:
        """Read the catalogue and store it again with a fresh TTL; the creator fills it when it is empty."""
        catalogue = self.directory.catalogue()
        if not catalogue and self.opts.creator:
            catalogue = {e.name: e for e in self.own_entries()}
            log.info("experts: catalogue of %d domains: %s", len(catalogue), ", ".join(catalogue))
        if self.seed_id:  # every domain branches from the seed this node serves, unless one is named already
            catalogue = {n: e if e.seed else CatalogueEntry(**{**vars(e), "seed": self.seed_id})
                         for n, e in catalogue.items()}
        if catalogue:
            self.directory.publish_catalogue(catalogue.values(), ttl=10 * self.opts.record_ttl)
        return catalogue


class ExpertWorker:
    """Runs jobs one after another on its own thread until stopped (or until the pipeline needs this node)."""

    def __init__(self, opts: ExpertOptions, directory: ExpertDirectory, members: SwarmDirectory,
                 tokenizer, model_config, metrics: ExpertMetrics, events: EventLog, stop: threading.Event,
                 auth=None, tls=None):
        self.opts = opts
        self.directory = directory
        self.members = members
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.metrics = metrics
        self.events = events
        self.stop = stop
        self.served = ServedExperts()
        self.catalogue = CatalogueKeeper(directory, opts, tokenizer)
        self.stage_needed: int | None = None  # set by the pipeline watch (auto role)
        self.auth = auth  # private swarms: RPCs carry a tag made with the swarm key
        self.tls = tls  # the swarm's certificate when it serves TLS
        self.clients = StageClients(WireLimits(), auth, tls)
        self._threads: list[threading.Thread] = []

    # ---- threads -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.opts.home.mkdir(parents=True, exist_ok=True)
        targets = [("experts", self._run), ("expert-records", self._refresh_loop)]
        if self.opts.watch_pipeline:
            targets.append(("pipeline-watch", self._watch_pipeline))
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)
        self.clients.close()

    def withdraw_all(self) -> None:
        for record in self.served.records():
            try:
                self.directory.withdraw(record, ttl=self.opts.record_ttl)
            except Exception as e:
                log.debug("could not withdraw expert %s: %r", record.id, e)

    def _refresh_loop(self) -> None:
        while not self.stop.wait(self.opts.refresh_s):
            try:
                for record in self.served.records():
                    self.directory.publish(record, ttl=self.opts.record_ttl)
                self.catalogue.refresh()
            except Exception as e:  # the DHT may be shutting down; the next refresh retries
                log.debug("expert record refresh failed: %r", e)

    def _watch_pipeline(self) -> None:
        """Auto role: the pipeline comes first. Count live replicas (records that answer a Ping) per stage."""
        while not self.stop.wait(self.opts.refresh_s):
            try:
                need = stage_in_need(self._live_members(), self.opts.num_stages, self.opts.min_replicas)
            except Exception as e:
                log.debug("pipeline watch failed: %r", e)
                continue
            if need is not None:
                log.info("stage %d has fewer than %d live replicas: stopping expert training to take it",
                         need, self.opts.min_replicas)
                self.stage_needed = need
                return

    def _live_members(self) -> dict[str, NodeRecord]:
        records = [r for r in self.members.members().values() if r.stages]

        def answers(record: NodeRecord) -> bool:
            try:
                self.clients.stub(record.endpoint).Ping(pb.PingRequest(), timeout=2.0)
                return True
            except grpc.RpcError:
                return False
        if not records:
            return {}
        with ThreadPoolExecutor(max_workers=min(8, len(records))) as pool:
            alive = list(pool.map(answers, records))
        return {r.peer_id: r for r, ok in zip(records, alive) if ok}

    def _halted(self) -> bool:
        return self.stop.is_set() or self.stage_needed is not None

    # ---- the job loop --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve_finished()
            if self.opts.seed_dir:
                self._serve_seed(Path(self.opts.seed_dir))
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
            except Exception as e:  # an expert failure must not take the node down: say why, retry, keep serving
                log.exception("expert training failed: %r", e)
                self.events.emit("expert_failed", reason=repr(e))
            self.stop.wait(max(self.opts.refresh_s, 5.0))

    def _serve_finished(self) -> None:
        """After a restart: serve and publish the finished experts this node trained before."""
        from experts.checkpoint import read_manifest, verify

        for job_file in sorted(self.opts.home.glob(f"*/{JOB}")):
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
        """Serve --expert-seed (sha256 verified) as the expert `seed-<sha>` of domain "*", named by the catalogue."""
        from experts.checkpoint import read_manifest, verify

        manifest = read_manifest(path)
        verify(path, manifest)
        manifest.domain = "*"
        record = ExpertRecord(id=f"seed-{manifest.weights_sha256[:12]}", peer_id=self.opts.peer_id,
                              endpoint=self.opts.endpoint, bytes=(path / WEIGHTS).stat().st_size,
                              dev_loss=math.log(manifest.val_ppl) if manifest.val_ppl else None,
                              manifest=manifest.to_dict())
        self.served.serve(record, path, snapshot=False)
        self.directory.publish(record, ttl=self.opts.record_ttl)
        self.catalogue.seed_id = record.id
        log.info("experts: serving %s as the catalogue's seed", record.id)

    def _unfinished_job(self, catalogue: dict[str, CatalogueEntry]) -> Job | None:
        """A job of this node that stopped before its last step (a restart, or a stop to take a stage)."""
        from experts.checkpoint import MANIFEST, read_manifest

        for job_file in sorted(self.opts.home.glob(f"*/{JOB}")):
            job = Job(**json.loads(job_file.read_text()))
            if not (job_file.parent / MANIFEST).is_file():  # stopped before its claim was saved: start over
                shutil.rmtree(job_file.parent)
                continue
            if job.domain not in catalogue or read_manifest(job_file.parent).complete:
                continue
            if self.catalogue.local_domain(catalogue[job.domain]) is not None:
                return job
        return None

    def _spent(self, catalogue: dict[str, CatalogueEntry], ignore_fresh_above: str | None,
               claim: str | None) -> dict[str, float]:
        """FLOPs per domain spent or committed by the swarm's experts (an unfinished one counts in full)."""
        flops = {d: 0.0 for d in catalogue}
        for record in self.directory.experts(catalogue):
            if record.id == claim:
                continue
            fresh = record.steps == 0
            if fresh and ignore_fresh_above is not None and record.peer_id > ignore_fresh_above:
                continue  # a claim made at the same time as ours by a peer that yields to us
            planned = float(record.manifest.get("extra", {}).get("planned_flops", 0.0))
            flops[record.domain] += record.flops if record.complete else max(record.flops, planned)
        return flops

    def _choose(self, catalogue: dict[str, CatalogueEntry], ignore_fresh_above: str | None = None,
                claim: str | None = None) -> str | None:
        from experts.sizing import choose_domain

        eligible = {name for name, entry in catalogue.items() if self.catalogue.local_domain(entry) is not None}
        difficulties = {name: e.difficulty for name, e in catalogue.items()}
        return choose_domain(difficulties, self._spent(catalogue, ignore_fresh_above, claim), eligible)

    def _new_job(self, catalogue: dict[str, CatalogueEntry]) -> Job | None:
        """Choose, claim (a step-0 record), let simultaneous claims settle, and re-choose if a lower peer id won."""
        from experts.sizing import POLICIES, make_plan

        for _ in range(3):
            domain = self._choose(catalogue)
            if domain is None:
                return None
            seed_model, seed_manifest = self._seed(catalogue[domain])
            method = POLICIES[self.opts.policy]
            plan = make_plan(method, {n: e.difficulty for n, e in catalogue.items()}, seed_model.config,
                             self.opts.medium_steps, self.opts.batch_size * self.opts.seq_len, self.opts.seq_len)
            ep = next(e for e in plan.experts if e.domain == domain)
            n = len(list(self.opts.home.glob(f"{domain}-*")))
            expert_id = f"{domain}-{self.opts.peer_id[-8:]}-{n}"
            job = Job(expert_id, domain, method, ep.intermediate_size, ep.steps, ep.flops,
                      int(hashlib.sha256(expert_id.encode()).hexdigest()[:8], 16), seed_manifest.to_dict())
            out = self.opts.home / job.id
            out.mkdir(parents=True, exist_ok=True)
            (out / JOB).write_text(json.dumps(asdict(job), indent=1) + "\n")
            self._train(job, catalogue, seed=(seed_model, seed_manifest), claim_only=True)
            if self.stop.wait(CLAIM_SETTLE_S):
                return job
            if self._choose(catalogue, ignore_fresh_above=self.opts.peer_id, claim=job.id) == domain:
                return job
            log.info("experts: another node claimed %s first; choosing again", domain)
            record = self.served.remove(job.id)
            if record is not None:
                self.directory.withdraw(record, ttl=self.opts.record_ttl)
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
            seed = (_model_of(seed_manifest.config), seed_manifest)
        from experts.checkpoint import read_manifest

        out = self.opts.home / job.id
        resumed = can_resume(out) and read_manifest(out).steps > 0
        settings = ExpertSettings(batch_size=self.opts.batch_size, seq_len=self.opts.seq_len, lr=self.opts.lr,
                                  save_every=self.opts.save_every, device=self.opts.device, dtype=self.opts.dtype)
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
        out = self.opts.home / job.id
        record = ExpertRecord(id=job.id, peer_id=self.opts.peer_id, endpoint=self.opts.endpoint,
                              bytes=(out / WEIGHTS).stat().st_size,
                              dev_loss=math.log(manifest.val_ppl) if manifest.val_ppl else None,
                              manifest=manifest.to_dict())
        self.served.serve(record, out)
        self.directory.publish(record, ttl=self.opts.record_ttl)
        self.metrics.published.inc()
        self.events.emit("expert_published", id=job.id, domain=job.domain, steps=manifest.steps,
                         target_steps=manifest.target_steps, sha256=manifest.weights_sha256)

    # ---- seeds ---------------------------------------------------------------------------------------------------
    def _seed(self, entry: CatalogueEntry):
        """The model an expert branches from: the catalogue's seed, the pipeline's weights, or the preset's init."""
        from experts.checkpoint import load_expert, new_model
        from experts.run import describe_seed

        if entry.seed:
            found = [r for r in self.directory.experts(["*"]) if r.id == entry.seed]
            for record in found:
                try:
                    path = self.opts.home / "seeds" / record.id
                    if not (path / "manifest.json").is_file():
                        path = download_expert(record, self.opts.swarm, self.opts.home / "seeds", auth=self.auth,
                                               tls=self.tls)
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
        model = new_model(self.model_config, self.opts.seed)
        return model, describe_seed(model, "init", self.tokenizer.name, f"seeded init (seed {self.opts.seed})")

    def _gather_pipeline(self):
        """Every stage's parameters from a serving replica, as one LlamaForCausalLM; None without a full pipeline."""
        import torch

        members = self.members.members()
        state, rounds = {}, []
        for stage in range(self.opts.num_stages):
            sources = sorted(p for p, r in members.items() if r.serving and stage in r.stages and r.round > 0)
            for peer in sources:
                try:
                    completed, tensors, _ = self.clients.fetch_state(members[peer].endpoint, self.opts.swarm, stage,
                                                                     timeout=30)
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
        model = _model_of(self.model_config)
        try:
            with torch.no_grad():
                model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            log.warning("pipeline weights do not fit one model (%s); using the seeded init", str(e).splitlines()[0])
            return None
        return model, min(rounds)


def _model_of(config):
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(config, dict):
        config = LlamaConfig.from_dict(config)
    return LlamaForCausalLM(config)


class ExpertRole:
    """The whole node in the expert role: gRPC (ExpertService, Ping, health), /metrics, heartbeat and the worker."""

    def __init__(self, daemon):
        from grpc_health.v1 import health

        self.daemon = daemon
        cfg = daemon.config
        self.config = cfg
        self.metrics = daemon.expert_metrics
        from node.host.rpc_guard import RpcGuard

        self.server = grpc.server(ThreadPoolExecutor(max_workers=8, thread_name_prefix="grpc"),
                                  interceptors=[RpcGuard(daemon.metrics), *daemon.trust.server_interceptors(daemon.metrics)])
        self.health = health.HealthServicer()
        self.worker: ExpertWorker | None = None
        self.metrics_server = None

    def start(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from node.errors import UsageError
        from node.expert.service import ExpertServicer
        from protocol.generated.swarm.v1 import experts_pb2_grpc

        d, cfg = self.daemon, self.config
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = d.trust.add_port(self.server, cfg.host, cfg.port)
        self.endpoint = f"{cfg.announce_host or cfg.host}:{port}"
        opts = expert_options(cfg, d.peer_id, self.endpoint, str(d.device), creator=cfg.new_swarm,
                              watch_pipeline=cfg.role == "auto")
        directory = ExpertDirectory(d.dht, cfg.swarm, lambda kind: self.metrics.malformed.labels(kind=kind).inc(),
                                    owner=d.trust.owner)
        self.worker = ExpertWorker(opts, directory, d.directory, d.tokenizer, d.spec.config, self.metrics, d.events,
                                   d.stop, auth=d.trust.auth, tls=d.trust.tls)
        servicer = ExpertServicer(cfg.swarm, self.worker.served,
                                  on_data_loss=lambda r: directory.withdraw(r, ttl=cfg.record_ttl),
                                  on_bytes=self.metrics.bytes_served.inc)
        experts_pb2_grpc.add_ExpertServiceServicer_to_server(servicer, self.server)
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        try:
            self.metrics_server, _, mport = d.metrics.serve(cfg.host, cfg.metrics_port)
        except OSError as e:
            raise UsageError(f"cannot serve metrics on port {cfg.metrics_port}: {e.strerror}") from None
        self.metrics_url = f"http://{cfg.announce_host or cfg.host}:{mport}/metrics"
        self.metrics.set_role("expert")
        self._announce()
        self.worker.start()

    def _announce(self) -> None:
        from hivemind.utils import get_dht_time

        from node.dataplane.servicer import VERSION

        d = self.daemon
        d.directory.announce(timeout=self.config.dht_write_timeout, record=NodeRecord(
            peer_id=d.peer_id, endpoint=self.endpoint, stages=(), compute_s={}, memory_slots=self.config.memory_slots,
            role="expert", version=VERSION, swarm=self.config.swarm, round=0, state=NodeState.SERVING,
            metrics_url=self.metrics_url, maddrs=tuple(d.maddrs), heartbeat_time=get_dht_time()))

    def run(self, stop: threading.Event) -> int | None:
        """Heartbeats until stopped; returns the stage to take when the pipeline needs this node (auto role)."""
        while not stop.wait(self.config.heartbeat_interval):
            if self.worker.stage_needed is not None:
                for thread in self.worker._threads[:1]:  # the job loop stops at its next step, at a checkpoint
                    thread.join(60)
                return self.worker.stage_needed
            try:
                self._announce()
                self.daemon.metrics.visible_peers.set(len(self.daemon.directory.members()))
            except Exception as e:  # the DHT may be shutting down; the next beat retries
                log.debug("heartbeat failed: %r", e)
        return None

    def shutdown(self) -> None:
        from grpc_health.v1 import health_pb2

        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.worker is not None:
            self.worker.join(timeout=10)  # the job loop stops at its next step, with a checkpoint
            self.worker.withdraw_all()
        if not self.daemon.directory.withdraw(timeout=self.config.dht_write_timeout):
            log.warning("could not store the tombstone in the DHT; the record expires in %.0f s",
                        self.config.record_ttl)
        self.server.stop(grace=self.config.drain_grace).wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


def expert_options(cfg, peer_id: str, endpoint: str, device: str, creator: bool, watch_pipeline: bool) -> ExpertOptions:
    root = Path(cfg.expert_dir).expanduser() if cfg.expert_dir else Path.home() / ".cache" / "swarm-node" / "experts"
    return ExpertOptions(
        swarm=cfg.swarm, peer_id=peer_id, endpoint=endpoint, home=root / cfg.swarm / peer_id, domains=cfg.domain,
        max_bytes=cfg.expert_max_bytes, policy=cfg.expert_policy, medium_steps=cfg.expert_steps or 300,
        save_every=cfg.expert_save_every, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, device=device,
        dtype=cfg.dtype, seed=cfg.seed, num_stages=cfg.num_stages, min_replicas=cfg.min_replicas,
        watch_pipeline=watch_pipeline, creator=creator, record_ttl=max(cfg.record_ttl, 4 * cfg.heartbeat_interval),
        refresh_s=cfg.heartbeat_interval, seed_dir=cfg.expert_seed)


def keep_catalogue(daemon) -> threading.Thread:
    """The node that started the swarm (in a stage role) publishes the catalogue and keeps it alive."""
    cfg = daemon.config
    opts = expert_options(cfg, daemon.peer_id, "", "cpu", creator=True, watch_pipeline=False)
    keeper = CatalogueKeeper(ExpertDirectory(daemon.dht, cfg.swarm, owner=daemon.trust.owner), opts, daemon.tokenizer)

    def loop() -> None:
        while True:
            try:
                keeper.refresh()
            except Exception as e:
                log.debug("catalogue refresh failed: %r", e)
            if daemon.stop.wait(max(opts.refresh_s, opts.record_ttl)):
                return
    thread = threading.Thread(target=loop, name="catalogue", daemon=True)
    thread.start()
    return thread
