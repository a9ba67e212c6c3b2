import argparse

import pytest

from node.config import add_node_arguments, load_config
from node.errors import UsageError


def parse(argv, environ=None):
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    return load_config(parser.parse_args(argv), environ or {})


def test_flags_override_env_which_overrides_the_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('new-swarm = true\nport = 7000\nmetrics_port = 7001\nstages = [2, 3]\nlr = 0.1\n')
    config = parse(["--config", str(path), "--port", "7100"], {"SWARM_NODE_METRICS_PORT": "7201"})
    assert (config.network.port, config.network.metrics_port, config.roles.stages, config.training.lr) == \
        (7100, 7201, "2,3", 0.1)
    assert config.roles.hosted_stages() == [2, 3] and config.swarm.new_swarm


@pytest.mark.parametrize("argv, environ, message", [
    (["--new-swarm", "--port", "70000"], {}, "--port = '70000': must be a port number"),
    (["--new-swarm", "--stages", "1,x"], {}, "--stages"),
    (["--new-swarm", "--stages", "5"], {}, "this swarm has stages 0..3"),
    (["--new-swarm", "--device", "tpu"], {}, "--device = 'tpu'"),
    (["--new-swarm"], {"SWARM_NODE_LR": "fast"}, "SWARM_NODE_LR = 'fast': must be a number"),
    (["--new-swarm"], {"SWARM_NODE_COLOUR": "red"}, "SWARM_NODE_COLOUR is not a setting"),
    ([], {}, "--initial-peers MADDR"),
    (["--new-swarm", "--initial-peers", "/ip4/1.2.3.4/tcp/1"], {}, "only one of them"),
    (["--new-swarm", "--max-inflight", "9", "--memory-slots", "4"], {}, "exceeds --memory-slots"),
    (["--new-swarm", "--sync-every", "0"], {}, "--sync-every = '0': must be a positive integer"),
    (["--new-swarm", "--sync-every", "-3"], {}, "--sync-every = '-3': must be a positive integer"),
    (["--new-swarm", "--sync", "gossip"], {}, "--sync = 'gossip': must be one of every-round, all-to-all, outer"),
    (["--new-swarm", "--sync-codec", "lowrank"], {}, "--sync-codec = 'lowrank': must be one of raw"),
    (["--new-swarm", "--outer-momentum", "1"], {}, "--outer-momentum = '1': must be a number in"),
])
def test_bad_settings_name_the_problem(argv, environ, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse(argv, environ)


def test_bad_config_files(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(UsageError, match="not valid TOML"):
        parse(["--config", str(broken)])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("new_swarm = true\nprot = 1\n")
    with pytest.raises(UsageError, match="unknown setting 'prot'"):
        parse(["--config", str(unknown)])
    with pytest.raises(UsageError, match="does not exist"):
        parse(["--config", str(tmp_path / "missing.toml")])
