import argparse

import pytest

from node.commands import experts as cmd
from node.errors import UsageError


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="swarm-node")
    cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture
def files(tmp_path, make_text):
    for kind in ("code", "prose"):
        (tmp_path / f"{kind}.txt").write_text(make_text(kind, 12_000))
    return [f"--domain=code={tmp_path / 'code.txt'}", f"--held-out=prose={tmp_path / 'prose.txt'}",
            f"--domain=more={tmp_path / 'prose.txt'}"]


def test_plan_prints_equal_flops_tables(files, capsys):
    assert run(["experts", "plan", *files, "--budget", "1e12"]) == 0
    out = capsys.readouterr().out
    for method in ("MHo-IHo", "MHe-IHo", "MHo-IHe"):
        assert f"{method}: total" in out
    assert out.count("+0.000% vs homogeneous") == 3


def test_train_then_eval_then_refuse_a_corrupt_expert(files, tmp_path, capsys):
    common = ["--seq-len", "32", "--batch-size", "2", "--device", "cpu", "--threads", "1"]
    out = tmp_path / "run"
    assert run(["experts", "train", *files, *common, "--steps", "3", "--seed-steps", "2", "--method", "MHe-IHo",
                "--out", str(out)]) == 0
    assert (out / "MHe-IHo" / "code" / "manifest.json").is_file()
    assert run(["experts", "eval", "--experts", str(out), *files, "--seq-len", "32", "--dev-windows", "4",
                "--test-windows", "4", "--csv", str(tmp_path / "eval.csv"), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "posterior" in table and "held-out" in table and (tmp_path / "eval.csv").is_file()
    weights = out / "MHe-IHo" / "code" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(UsageError, match="sha256"):
        run(["experts", "eval", "--experts", str(out), *files, "--seq-len", "32", "--device", "cpu"])


def test_usage_errors_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        run(["experts", "plan", f"--domain=a={tmp_path / 'nope.txt'}"])
    with pytest.raises(UsageError, match="no expert checkpoints"):
        run(["experts", "eval", "--experts", str(tmp_path)])
    with pytest.raises(UsageError, match="one --method"):
        run(["experts", "train", "--method", "all", "--out", str(tmp_path)])
