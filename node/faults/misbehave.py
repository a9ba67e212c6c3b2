"""`--misbehave KIND`, a test tool (off by default, like `--emulate-links`): this node acts as a hostile member
would, from round `--misbehave-from` on, so that tests and bench/bench_poison.py can check the swarm's defences
against it. Never set it on a node that trains for real.

- `huge-gradient`: the gradients it posts for averaging (every-round and all-to-all) are scaled by 10^4; its
  replicas leave them out (node/sync/averaging.py, `--outlier-ratio`).
- `scale-activations`: the activations it forwards are scaled by 100;
- `noise-activations`: they get Gaussian noise 30 times their own RMS added.
  Both are caught by the receiver's hop checks (node/stage/hop_checks.py), which report this node to the
  microbatch's origin; the origin bans it (node/faults/bans.py). Noise or scaling within --hop-check-band
  (10x) of the honest size passes those checks: only a recomputation could see it.
- `flip-gradient`: the gradients it sends back along the pipeline have their sign flipped. Their size is
  honest, so the cheap hop checks cannot see it: only a recomputation can (issue 16's sampled cross-checks,
  not built yet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # node/config.py reads KINDS: no torch at import
    import torch

NONE = "none"  # behave: the default
HUGE_GRADIENT = "huge-gradient"
SCALE_ACTIVATIONS = "scale-activations"
NOISE_ACTIVATIONS = "noise-activations"
FLIP_GRADIENT = "flip-gradient"
KINDS = (NONE, HUGE_GRADIENT, SCALE_ACTIVATIONS, NOISE_ACTIVATIONS, FLIP_GRADIENT)
HUGE_SCALE = 1e4
ACTIVATION_SCALE = 100.0
NOISE_RATIO = 30.0  # the noise's standard deviation over the activations' RMS (10: on the size check's edge)


def posted(kind: str, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """What a node misbehaving as `kind` posts for averaging instead of `grads` (copies)."""
    scale = HUGE_SCALE if kind == HUGE_GRADIENT else 1.0
    return [g.detach() * scale if scale != 1.0 else g.detach().clone() for g in grads]


def sent(kind: str, direction: str, tensor: torch.Tensor) -> torch.Tensor:
    """What a node misbehaving as `kind` sends along the pipeline instead of `tensor` (`direction`: forward
    or backward); `tensor` itself when the kind leaves that direction alone."""
    if direction == "forward" and kind == SCALE_ACTIVATIONS:
        return tensor * ACTIVATION_SCALE
    if direction == "forward" and kind == NOISE_ACTIVATIONS:
        import torch

        rms = tensor.float().pow(2).mean().sqrt()
        return tensor + (torch.randn_like(tensor, dtype=torch.float32) * NOISE_RATIO * rms).to(tensor.dtype)
    if direction == "backward" and kind == FLIP_GRADIENT:
        return -tensor
    return tensor
