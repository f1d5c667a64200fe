"""emov2_gen.evaluation.lr_sweep: the rule that picks each model's learning rate in the fair comparisons."""

from __future__ import annotations

import math

import pytest

from emov2_gen.evaluation.lr_sweep import best_learning_rate, check_sweep, on_sweep_edge


def test_best_rate_follows_the_metric_direction():
    losses = {1e-4: 0.30, 3e-4: 0.21, 1e-3: 0.25}
    assert best_learning_rate(losses, higher_is_better=False) == 3e-4
    assert best_learning_rate(losses, higher_is_better=True) == 1e-4


def test_diverged_runs_never_win_and_ties_take_the_smaller_rate():
    assert best_learning_rate({1e-3: math.nan, 3e-3: math.inf, 1e-4: 0.5}, higher_is_better=False) == 1e-4
    assert best_learning_rate({1e-3: math.nan, 3e-3: 80.0}, higher_is_better=True) == 3e-3
    assert best_learning_rate({2e-3: 70.0, 1e-3: 70.0}, higher_is_better=True) == 1e-3
    with pytest.raises(ValueError, match="No learning rate"):
        best_learning_rate({1e-3: math.nan}, higher_is_better=True)


def test_sweep_is_checked_and_sorted():
    assert check_sweep([1e-3, 1e-4, 3e-4]) == [1e-4, 3e-4, 1e-3]
    for bad in ([], [1e-3, 0.0], [1e-3, math.nan], [1e-3, 1e-3]):
        with pytest.raises(ValueError):
            check_sweep(bad)


def test_edge_of_the_sweep_is_flagged():
    assert on_sweep_edge(1e-4, [3e-4, 1e-4, 1e-3]) and on_sweep_edge(1e-3, [3e-4, 1e-4, 1e-3])
    assert not on_sweep_edge(3e-4, [3e-4, 1e-4, 1e-3]) and not on_sweep_edge(1e-3, [1e-3])
