import csv

from experts.bench import BenchConfig, report, run_bench, summarise, write_csv
from experts.domains import Domains, make_domain
from lm.tokenizer import ByteTokenizer


def test_bench_runs_end_to_end_and_reports_every_domain(tmp_path, make_text):
    tok = ByteTokenizer()
    domains = Domains([make_domain("code", "toy", make_text("code"), tok),
                       make_domain("prose", "toy", make_text("prose"), tok),
                       make_domain("mixed", "toy", make_text("code", 3000) + make_text("prose", 3000), tok, True)])
    cfg = BenchConfig(seeds=(0, 1), hidden_size=32, heads=2, layers=1, medium_width=64, expert_steps=2,
                      seed_steps=2, batch_size=2, seq_len=32, dev_windows=2, test_windows=2)
    result = run_bench(cfg, domains, tok.name, tok.vocab_size, tmp_path / "work", log=lambda _: None)
    # 2 seeds x (seed model + 3 methods x 4 variants) x 3 domains
    assert len(result.rows) == 2 * (1 + 3 * 4) * 3
    s = summarise(result)
    assert sum(s["wins"].values()) == 3 and s["domains"] == 3
    text = report(result, "swarm-node experts bench")
    assert "| mixed | held-out |" in text and "MHe-IHo" in text and "Difficulty ranking" in text
    write_csv(result, tmp_path / "b.csv")
    assert len(list(csv.DictReader(open(tmp_path / "b.csv")))) == len(result.rows)
    # a second run reuses every finished checkpoint and gives the same numbers
    again = run_bench(cfg, domains, tok.name, tok.vocab_size, tmp_path / "work", log=lambda _: None)
    assert again.rows == result.rows


def test_bench_retrains_when_a_domain_changed(tmp_path, make_text):
    tok = ByteTokenizer()
    cfg = BenchConfig(seeds=(0,), hidden_size=32, heads=2, layers=1, medium_width=64, expert_steps=2,
                      seed_steps=2, batch_size=2, seq_len=32, dev_windows=2, test_windows=2)

    def trained_names(code_text: str) -> list[str]:
        lines = []
        domains = Domains([make_domain("code", "toy", code_text, tok),
                           make_domain("prose", "toy", make_text("prose"), tok)])
        run_bench(cfg, domains, tok.name, tok.vocab_size, tmp_path, log=lines.append)
        return [line.split()[0] for line in lines if "steps" in line and "width" in line]

    assert len(trained_names(make_text("code"))) == 1 + 3 * 2
    assert trained_names(make_text("code")) == []  # all reused
    changed = trained_names(make_text("code")[:-10] + "# changed\n")
    assert "seed0/seed-model" in changed and "seed0/MHo-IHo/code" in changed
