"""The committed protocol/generated/ matches what scripts/gen_proto.sh makes from proto/ today."""

import filecmp
import os
import subprocess
import sys

from tests.helpers import REPO


def test_generated_code_is_up_to_date(tmp_path):
    (tmp_path / "swarm" / "v1").mkdir(parents=True)
    subprocess.run(["bash", str(REPO / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHON": sys.executable})
    committed = REPO / "protocol" / "generated" / "swarm" / "v1"
    for name in (f"{proto}{suffix}" for proto in ("stage_pb2", "experts_pb2", "relay_pb2") for suffix in (".py", "_grpc.py", ".pyi")):
        assert filecmp.cmp(tmp_path / "swarm" / "v1" / name, committed / name, shallow=False), \
            f"protocol/generated/swarm/v1/{name} is stale: run scripts/gen_proto.sh"
