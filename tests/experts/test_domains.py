import json
import random

import pytest

from experts.domains import Domains, difficulty, domains_from_specs, make_domain, parse_spec
from lm.tokenizer import ByteTokenizer


def test_difficulty_ranks_random_text_above_repetitive_text():
    rng = random.Random(0)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.\n") for _ in range(20_000))
    assert difficulty("hello world. " * 2000) < 1.0 < difficulty(noise)


def test_domains_from_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 500)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} says hello"}) for i in range(300)))
    domains = domains_from_specs([f"a={tmp_path / 'a.txt'}", f"b={tmp_path / 'b.jsonl'}"],
                                 [f"c={tmp_path / 'a.txt'}"], ByteTokenizer(), max_bytes=4000)
    assert [d.name for d in domains.trained] == ["a", "b"] and [d.name for d in domains.held_out] == ["c"]
    a = domains.get("a")
    assert a.tokens == 4000 and len(a.train) == 3600 and len(a.dev) == 200 and len(a.test) == 200
    assert "record 0 says hello" in ByteTokenizer().decode(domains.get("b").train.tokens[:40].tolist())
    assert "held-out" in domains.table()


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_spec("no-equals-sign")
    with pytest.raises(ValueError, match="does not exist"):
        domains_from_specs([f"a={tmp_path / 'missing.txt'}"], [], ByteTokenizer())
    d = make_domain("a", "x", "some text " * 50, ByteTokenizer())
    with pytest.raises(ValueError, match="unique"):
        Domains([d, d])


def test_domain_digest_tracks_its_tokens():
    a = make_domain("a", "x", "some text " * 50, ByteTokenizer())
    same = make_domain("b", "y", "some text " * 50, ByteTokenizer())
    other = make_domain("a", "x", "some text " * 49 + "other", ByteTokenizer())
    assert a.sha256 == same.sha256 != other.sha256 and a.summary()["sha256"] == a.sha256
