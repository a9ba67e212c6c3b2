"""The one moving average the node keeps of measured times (links, compute)."""


def ewma(previous: float | None, sample: float, weight: float) -> float:
    """An exponentially weighted mean: `weight` is the share of the new sample."""
    return sample if previous is None else (1 - weight) * previous + weight * sample
