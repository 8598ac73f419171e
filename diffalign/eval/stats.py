"""Summary statistics for model comparisons: means and paired win rates with 95% intervals."""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054


def mean_interval(values: torch.Tensor) -> tuple[float, float, float]:
    """Mean and its 95% confidence interval: for 0/1 values (a pass rate, such as toy_adherence) the Wilson
    interval, which stays inside [0, 1]; else the normal approximation mean ± 1.96·s/√n."""
    values = values.double().flatten()
    mean = float(values.mean())
    if values.numel() < 2:
        return mean, mean, mean
    if bool(((values == 0) | (values == 1)).all()):
        return (mean, *wilson_interval(mean, values.numel()))
    half = Z95 * float(values.std(unbiased=True)) / math.sqrt(values.numel())
    return mean, mean - half, mean + half


def wilson_interval(p: float, n: int) -> tuple[float, float]:
    """The Wilson 95% score interval of a proportion ``p`` observed over ``n`` trials (inside [0, 1])."""
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(candidate: torch.Tensor, baseline: torch.Tensor) -> tuple[float, float, float]:
    """How often ``candidate`` beats ``baseline`` on paired scores (same prompt, same seed).

    A tie counts one half. Returns (rate, low, high): the Wilson 95% score interval, which
    stays inside [0, 1] and behaves at rates near 0 or 1 where the normal interval does not.
    """
    if candidate.shape != baseline.shape:
        raise ValueError(f"paired scores differ in shape: {tuple(candidate.shape)} vs {tuple(baseline.shape)}")
    outcome = (candidate > baseline).double() + 0.5 * (candidate == baseline).double()
    p = float(outcome.mean())
    return (p, *wilson_interval(p, outcome.numel()))
