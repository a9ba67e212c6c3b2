import pytest
import torch
from transformers import LlamaConfig

from experts.domains import make_domain
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


@pytest.fixture
def prose_domain():
    return make_domain("prose", "toy", text_of("prose"), ByteTokenizer())
