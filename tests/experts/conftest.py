import pytest
import torch
from transformers import LlamaConfig

from experts.checkpoint import new_model
from experts.domains import make_domain
from experts.train import Identity, TrainConfig, train
from lm.tokenizer import ByteTokenizer

torch.set_num_threads(1)


@pytest.fixture
def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False)


def text_of(kind: str, n: int = 6000) -> str:
    """Two clearly different toy domains: code-like and prose-like."""
    if kind == "code":
        return "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(n // 30))
    return "".join(f"The {w} river flows slowly past the {v} hills. " for w, v in
                   zip(["red", "blue", "green", "grey"] * n, ["old", "quiet", "tall"] * n))[:n]


@pytest.fixture
def make_text():
    return text_of


@pytest.fixture
def code_domain():
    return make_domain("code", "toy", text_of("code"), ByteTokenizer())


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """Two tiny experts, each trained briefly on its own domain."""
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("experts")
    domains = [make_domain(k, "toy", text_of(k), ByteTokenizer()) for k in ("code", "prose")]
    pairs = []
    for d in domains:
        cfg = TrainConfig(steps=25, batch_size=4, seq_len=32, lr=1e-2, eval_windows=4)
        model = new_model(config, 0)
        manifest = train(model, d.train, d.dev, cfg, out / d.name, Identity(d.name, d.name, "bytes-v1"),
                         progress=False).manifest
        pairs.append((manifest, model))
    return pairs, domains
