"""Learning-rate selection for fair comparisons: every model is trained at each rate of a small sweep and compared
at its own best rate, chosen on a validation metric (never on the data that the final numbers are reported on).

Used by `eval/fair_compare.py` (generation: lowest held-out denoising loss) and `eval/seg_benchmark.py`
(segmentation: highest validation vessel Dice).
"""

from __future__ import annotations

import math
from typing import Mapping


def check_sweep(learning_rates: list[float]) -> list[float]:
    """The sweep's rates, sorted and checked: at least one, all positive and finite, no repeats."""
    if not learning_rates:
        raise ValueError("The learning-rate sweep is empty; pass at least one rate.")
    bad = [lr for lr in learning_rates if not (math.isfinite(lr) and lr > 0)]
    if bad:
        raise ValueError(f"Learning rates must be positive and finite, got {bad}.")
    if len(set(learning_rates)) != len(learning_rates):
        raise ValueError(f"The learning-rate sweep repeats a rate: {learning_rates}.")
    return sorted(learning_rates)


def best_learning_rate(scores: Mapping[float, float], higher_is_better: bool) -> float:
    """The rate with the best validation score; non-finite scores (a diverged run) never win.

    Ties go to the smaller rate (the safer choice). Raises if every run diverged.
    """
    finite = {lr: score for lr, score in scores.items() if math.isfinite(score)}
    if not finite:
        raise ValueError(f"No learning rate gave a finite validation score: {dict(scores)}.")
    sign = -1.0 if higher_is_better else 1.0
    return min(finite, key=lambda lr: (sign * finite[lr], lr))


def on_sweep_edge(best: float, learning_rates: list[float]) -> bool:
    """Whether the best rate is the sweep's smallest or largest (the optimum may lie outside: widen the sweep)."""
    rates = sorted(learning_rates)
    return len(rates) > 1 and best in (rates[0], rates[-1])
