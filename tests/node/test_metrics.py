"""A real Prometheus server scrapes a training node's /metrics."""

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


def test_prometheus_scrapes_a_training_node(tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, "install prometheus (apt-get install prometheus); scripts/test.sh does it as root"
    swarm = LocalSwarm(tmp_path, "metrics", common_args=["--num-stages", "1", "--torch-threads", "1",
                                                         "--device", "cpu"])
    server = None
    try:
        node = swarm.start_node("solo", "0")
        swarm.wait_started([node], timeout=120)
        target = urllib.parse.urlparse(node.started()["metrics_url"]).netloc
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: swarm-node\n"
                          f"    static_configs:\n      - targets: ['{target}']\n")
        port = free_port()
        server = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        wait_for(lambda: _query(port, 'up{job="swarm-node"} == 1'), 60, "Prometheus to scrape the node")
        forwarded = wait_for(lambda: _query(port, 'swarm_node_microbatches_forwarded_total{stage="0"} > 0'),
                             60, "forward passes in Prometheus")
        assert float(forwarded[0]["value"][1]) > 0
        loss = wait_for(lambda: _query(port, "swarm_node_loss > 0"), 30, "the loss gauge")
        assert 0 < float(loss[0]["value"][1]) < 10
        for series in ("swarm_node_round_duration_seconds_count", "swarm_node_sent_bytes_total",
                       "swarm_node_visible_peers", "swarm_node_dht_heartbeat_age_seconds",
                       "swarm_node_tokens_total"):
            assert _query(port, series), f"{series} was not scraped"
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        swarm.stop()
