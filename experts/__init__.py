"""HDEE domain experts: independent LLaMA experts sized by domain difficulty, mixed per token at inference.

- `domains`: the domain registry, offline default corpus and the difficulty measure.
- `sizing`: equal-FLOPs plans (MHo-IHo, MHe-IHo, MHo-IHe) and the FLOPs count.
- `branch`: an expert from the shared seed model, with its MLP resized to the plan's width.
- `train`: resumable training to a checkpoint; `checkpoint` / `manifest`: saving, loading, verifying.
- `run`: the training orchestration (seed, one expert, an ensemble) that the CLI and the node both call.
- `generate`: sampling from the posterior mixture.
- `mixture` / `evaluate`: the Bayesian posterior mixture and per-domain perplexities.
- `bench`: the three-way comparison behind `swarm-node experts bench`.
"""
