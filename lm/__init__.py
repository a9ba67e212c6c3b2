"""Language-model building blocks shared by `node` and `experts`.

- `presets`: named LLaMA configurations and how layers split into stages.
- `tokenizer`: the offline byte-level tokenizer, or an HF tokenizer directory.
- `data`: text/jsonl files, HF datasets, the offline default corpus, and microbatch sampling.
- `stage`: one pipeline stage built from transformers' LLaMA modules (never re-implemented).
- `checkpoint`: loading just one stage's tensors from an HF `LlamaForCausalLM` directory.
"""
