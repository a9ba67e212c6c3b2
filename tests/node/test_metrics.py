"""A real Prometheus server scrapes a two-node training swarm's /metrics, and the values move with the work."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from node.process.local_swarm import LocalSwarm
from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.slow


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]["result"]
    except OSError:
        return []


def _value(port: int, expr: str) -> float | None:
    result = _query(port, expr)
    return float(result[0]["value"][1]) if result else None


# What a round's work moves, summed over the swarm's two nodes as Prometheus scraped them.
MOVING = {"microbatches": 'sum(swarm_node_microbatches_forwarded_total{stage="1"})',
          "rounds": "sum(swarm_node_round_duration_seconds_count)",
          "tokens": "sum(swarm_node_tokens_total)",
          "activation bytes sent": 'sum(swarm_node_sent_bytes_total{kind="activations"})',
          "activation bytes received": 'sum(swarm_node_received_bytes_total{kind="activations"})'}


def test_prometheus_scrapes_a_training_swarm_and_its_values_move_with_the_work(tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, "install prometheus (apt-get install prometheus); scripts/test.sh does it as root"
    swarm = LocalSwarm(tmp_path, "metrics", common_args=["--num-stages", "2", "--torch-threads", "1",
                                                         "--device", "cpu"])
    server = None
    try:
        data = swarm.start_node("data", "0")
        swarm.wait_started([data], timeout=120)
        stage = swarm.start_node("stage", "1", initial_peers=swarm.initial_peers())
        swarm.wait_started([stage], timeout=120)
        targets = [urllib.parse.urlparse(n.started()["metrics_url"]).netloc for n in (data, stage)]
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: swarm-node\n"
                          f"    static_configs:\n      - targets: {json.dumps(targets)}\n")
        port = free_port()
        server = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        wait_for(lambda: _value(port, 'count(up{job="swarm-node"} == 1)') == 2, 60, "Prometheus to scrape both nodes")
        first = wait_for(lambda: (lambda v: v if all(x is not None and x > 0 for x in v.values()) else None)(
            {what: _value(port, expr) for what, expr in MOVING.items()}), 90, "a round's work in Prometheus")
        # Two more rounds later, every value has grown: they count work, they do not merely exist.
        wait_for(lambda: (_value(port, MOVING["rounds"]) or 0) >= first["rounds"] + 4, 90, "two more rounds")
        later = wait_for(lambda: (lambda v: v if all(v[w] is not None and v[w] > first[w] for w in v) else None)(
            {what: _value(port, expr) for what, expr in MOVING.items()}), 30, "every value to grow")
        assert later["tokens"] - first["tokens"] >= 2 * 4 * 64, (first, later)  # 2 rounds of at least a sequence
        loss = _value(port, "swarm_node_loss")
        assert loss is not None and 0 < loss < 10
        for series in ("swarm_node_visible_peers", "swarm_node_dht_heartbeat_age_seconds"):
            assert _query(port, series), f"{series} was not scraped"
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        swarm.stop()
