"""docker/ checked without a Docker daemon: compose and Prometheus configs validate, the dashboard queries
only metrics a node exports, and the image's entrypoint and health check work when run on this host."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from node.expert.metrics import ExpertMetrics
from node.host.metrics import NodeMetrics
from tests.helpers import REPO, free_port, run_cli, wait_for

DOCKER = REPO / "docker"


def _dockerfile_env() -> dict[str, str]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    return dict(re.findall(r"(SWARM_NODE_[A-Z_]+)=(\S+)", text))


def test_dockerfile_runs_swarm_node_as_a_user_with_a_health_check():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"ARG BASE_IMAGE=nvidia/cuda:\S+-runtime", text) and "FROM ${BASE_IMAGE}" in text
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert 'ENTRYPOINT ["swarm-node", "run"]' in text
    assert re.search(r'HEALTHCHECK .*\n.*CMD \["swarm-node", "health"', text)
    for source in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_compose_and_prometheus_configs_validate():
    compose = DOCKER / "compose.yaml"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        result = subprocess.run(["docker", "compose", "-f", str(compose), "config", "-q"], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(compose.read_text())  # without the compose plugin: the structure, checked here
    services = spec["services"]
    assert {"bootstrap", "prometheus", "grafana"} <= services.keys()
    nodes = {name: s for name, s in services.items() if s.get("image") == "swarm-node:latest" and name != "init"}
    assert len(nodes) >= 3
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"compose mounts {source}, which does not exist"
    promtool = shutil.which("promtool")
    assert promtool, "install prometheus (apt-get install prometheus); scripts/test.sh does it as root"
    config = DOCKER / "prometheus" / "prometheus.yml"
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Prometheus scrapes every node, at the metrics port the image serves on.
    targets = {t for job in yaml.safe_load(config.read_text())["scrape_configs"]
               for group in job["static_configs"] for t in group["targets"]}
    port = _dockerfile_env()["SWARM_NODE_METRICS_PORT"]
    assert targets == {f"{s['networks']['swarm']['ipv4_address']}:{port}" for s in nodes.values()}


def test_dashboard_queries_name_exported_metrics():
    metrics = NodeMetrics()
    metrics.watch_dht_refusals(lambda: 0)
    metrics.set_loss(1.0)  # exported once a data node has a loss
    ExpertMetrics(metrics.registry).train_loss.labels(domain="d").set(1.0)  # the expert role's, same registry
    exported = {family.name + suffix for family in metrics.registry.collect()
                for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "swarm-node.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(dashboard["panels"]) >= 8
    for expr in exprs:
        names = re.findall(r"\bswarm_node_\w+", expr)
        assert names, expr
        for name in names:
            assert name in exported, f"dashboard query {expr!r} names {name}, which no node exports"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in ("loss", "tokens", "round time", "microbatches per stage", "rpc latency", "peers", "failures",
                 "experts"):
        assert word in titles


@pytest.mark.slow
def test_the_entrypoint_serves_and_reports_healthy(tmp_path):
    """`swarm-node run` with the image's settings (free ports here), then the image's health check command.

    The node serves TLS derived from a swarm key, so the health check must speak it too, and so must
    `swarm-node eval`, which fetches the node's stage from it."""
    key = tmp_path / "swarm.key"
    assert run_cli("keygen", str(key)).returncode == 0
    env = {**os.environ, **_dockerfile_env(), "SWARM_NODE_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1",
           "SWARM_NODE_SWARM_KEY": str(key), "SWARM_NODE_TLS": "true"}
    ports = {name: str(free_port()) for name in ("SWARM_NODE_PORT", "SWARM_NODE_DHT_PORT", "SWARM_NODE_METRICS_PORT")}
    env.update(ports)
    endpoint = f"127.0.0.1:{ports['SWARM_NODE_PORT']}"
    tls = ["--swarm-key", str(key), "--tls"]
    assert run_cli("health", "--endpoint", endpoint, "--timeout", "1", *tls).returncode == 1  # nothing there yet
    log = (tmp_path / "node.log").open("w")
    events = tmp_path / "node.events.jsonl"
    node = subprocess.Popen([sys.executable, "-m", "node", "run", "--new-swarm", "--stages", "0", "--num-stages", "1",
                             "--torch-threads", "1", "--device", "cpu", "--events-file", str(events)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        wait_for(lambda: run_cli("health", "--endpoint", endpoint, "--timeout", "1", *tls).returncode == 0 or
                 node.poll() is not None, 120, "the node to report SERVING")
        assert node.poll() is None, (tmp_path / "node.log").read_text()
        assert run_cli("health", "--endpoint", endpoint, "--timeout", "2").returncode == 1  # plaintext: refused
        maddr = next(json.loads(line) for line in events.read_text().splitlines()
                     if json.loads(line)["event"] == "started")["maddrs"][0]
        (tmp_path / "held.txt").write_text("a held-out line of text\n" * 200)
        evaluated = run_cli("eval", "--initial-peers", maddr, "--num-stages", "1", "--data", str(tmp_path / "held.txt"),
                            "--seq-len", "32", "--max-sequences", "4", "--json", *tls)
        assert evaluated.returncode == 0, evaluated.stderr
        assert json.loads(evaluated.stdout)["perplexity"] > 1
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
