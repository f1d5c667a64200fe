"""LossCollapseDetector (training_utils): a run whose loss climbs back to the zero prediction's is stopped; a slow
start, a passing spike or a disabled check is not; the status a sweep reads is the divergence one."""

from __future__ import annotations

import pytest

from emov2_gen import training_utils
from emov2_gen.training_utils import DIVERGED_EXIT_CODE, LossCollapseDetector, LossCollapseError


def feed(detector: LossCollapseDetector, ratios: list[float], zero_loss: float = 2.0) -> list[bool]:
    """One update per ratio (loss = ratio x the zero prediction's loss); what the detector answered."""
    return [detector.update(ratio * zero_loss, zero_loss) for ratio in ratios]


def test_a_run_that_learned_and_went_back_to_the_zero_prediction_collapses():
    answers = feed(LossCollapseDetector(window=4), [1.0] * 3 + [0.1] * 8 + [1.0] * 4)
    # The window mean reaches 0.9 only at the 4th step of ones: (0.1 + 3 x 1.0) / 4 = 0.775 before it.
    assert answers.index(True) == len(answers) - 1


def test_a_slow_start_never_counts_as_a_collapse():
    """Without having learned (a window mean <= 50% of the zero prediction's) a loss near the start is no collapse."""
    assert not any(feed(LossCollapseDetector(window=4), [1.0] * 10 + [0.6] * 20 + [1.0] * 20))


def test_a_spike_within_one_window_is_no_collapse():
    detector = LossCollapseDetector(window=10)
    assert not any(feed(detector, [0.1] * 20 + [5.0, 0.1, 0.1] + [0.1] * 10))  # window mean of the spike: 0.59
    assert detector.lowest_ratio == pytest.approx(0.1)


def test_window_zero_turns_the_check_off():
    assert not any(feed(LossCollapseDetector(window=0), [0.1] * 10 + [1.0] * 10))


def test_the_state_round_trips_so_a_resumed_run_remembers_it_had_learned():
    detector = LossCollapseDetector(window=3)
    feed(detector, [0.1] * 5)
    resumed = LossCollapseDetector(window=3)
    resumed.load_state_dict(detector.state_dict())
    assert feed(resumed, [1.0] * 3) == [False, False, True]
    fresh = LossCollapseDetector(window=3)  # without the state the same losses read as a slow start
    assert not any(feed(fresh, [1.0] * 3))
    assert "collapsed at optimiser step 8" in resumed.message(8) and "100%" in resumed.message(8)


@pytest.mark.parametrize("error", [LossCollapseError("collapsed"), FloatingPointError("nan")])
def test_a_collapse_exits_with_the_status_sweeps_read_as_diverged(error):
    def main():
        raise error

    with pytest.raises(SystemExit) as stop:
        training_utils.exit_on_divergence(main)
    assert stop.value.code == DIVERGED_EXIT_CODE


def test_other_errors_propagate():
    def main():
        raise ValueError("bad flag")

    with pytest.raises(ValueError, match="bad flag"):
        training_utils.exit_on_divergence(main)
