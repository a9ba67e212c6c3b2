"""Wire semantics: envelopes and paths, the tensor codec, limits and errors. Knows messages, not training."""
