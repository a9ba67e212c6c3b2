import json

import pytest
import torch

from lm.data import TokenStream, default_corpus, load_corpus, load_hf_dataset, read_text_file
from lm.tokenizer import ByteTokenizer, load_tokenizer


def test_jsonl_and_text_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    (tmp_path / "b.txt").write_text("plain")
    assert read_text_file(tmp_path / "a.jsonl") == "hello\n\nworld"
    stream = load_corpus([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], None, ByteTokenizer())
    assert ByteTokenizer().decode(stream.tokens.tolist()) == "hello\n\nworld\n\nplain"


def test_bad_data_files_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_text_file(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")


def test_default_corpus_is_deterministic_and_offline():
    a, b = default_corpus(100_000), default_corpus(100_000)
    assert a == b and len(a) >= 100_000 and "def " in a


def test_sampling_is_reproducible_and_in_range():
    stream = TokenStream.from_text("abcdefghij" * 100, ByteTokenizer())
    x = stream.sample(torch.Generator().manual_seed(1), 4, 16)
    y = stream.sample(torch.Generator().manual_seed(1), 4, 16)
    assert x.shape == (4, 16) and torch.equal(x, y)
    train, dev, test = stream.split((0.8, 0.1, 0.1))
    assert len(train) + len(dev) + len(test) == len(stream)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        dev.sample(torch.Generator(), 1, 1000)


def test_hf_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("hello world nope") == [1, 2, 0] and tok.vocab_size == 3
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))


def test_hf_dataset_from_a_local_directory(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(3)))
    assert load_hf_dataset(str(tmp_path)) == "line 0\n\nline 1\n\nline 2"
    with pytest.raises(ValueError, match="no column 'body'"):
        load_hf_dataset(str(tmp_path), text_field="body")
