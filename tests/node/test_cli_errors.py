"""Bad input on the command line: one line on stderr naming the problem, exit 2, no traceback."""

import socket

import pytest

from tests.helpers import run_cli


@pytest.mark.parametrize("args, env, expected", [
    (["run", "--new-swarm", "--stages", "zero"], {}, "--stages"),
    (["run", "--new-swarm", "--port", "-1"], {}, "--port"),
    (["run", "--new-swarm", "--sync-every", "0"], {}, "--sync-every"),
    (["run", "--new-swarm", "--reachability-recheck", "-5"], {}, "--reachability-recheck"),
    (["run", "--new-swarm"], {"SWARM_NODE_REACHABILITY_RECHECK": "soon"}, "SWARM_NODE_REACHABILITY_RECHECK"),
    (["run", "--new-swarm", "--relay-limit", "-1"], {}, "--relay-limit"),
    (["run", "--new-swarm", "--relay-limit", "fast"], {}, "--relay-limit"),
    (["run", "--new-swarm", "--relay-nodes", "0"], {}, "--relay-nodes"),
    (["run", "--new-swarm"], {"SWARM_NODE_RELAY_PORT": "70000"}, "SWARM_NODE_RELAY_PORT"),
    (["run", "--new-swarm", "--bogus"], {}, "unrecognized arguments: --bogus"),
    (["run"], {}, "--initial-peers"),
    (["run", "--new-swarm"], {"SWARM_NODE_SEQ_LEN": "0"}, "SWARM_NODE_SEQ_LEN"),
    (["run", "--new-swarm", "--model", "/nonexistent", "--metrics-port", "0"], {}, "--model"),
    (["run", "--new-swarm", "--num-stages", "99"], {}, "cannot split 8 layers into 99 stages"),
    (["frobnicate"], {}, "invalid choice"),
    (["demo", "--layout", "1,2"], {}, "--layout"),
])
def test_one_clear_line_and_exit_2(args, env, expected):
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("swarm-node: error:") and expected in lines[0], result.stderr


def test_taken_ports_are_reported():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flag, expected in [("--port", "cannot serve gRPC"), ("--metrics-port", "cannot serve metrics"),
                               ("--relay-port", "cannot serve relay tunnels")]:
            result = run_cli("run", "--new-swarm", "--stages", "0", "--num-stages", "1", flag, port)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            assert expected in result.stderr.strip().splitlines()[-1]
