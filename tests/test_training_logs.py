"""Reading training runs' tensorboard scalars (resumed runs merged by step), smoothing, summaries and the plot CLI."""

import os
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from emov2_gen.evaluation.training_logs import ema_smooth, read_scalars, summarise_run
from script_runs import load_script

REPO = Path(__file__).resolve().parents[1]


def log_run(folder: Path, losses: dict[int, float], throughput: float = 100.0, mtime: float | None = None) -> None:
    writer = SummaryWriter(str(folder))
    for step, loss in losses.items():
        writer.add_scalar("loss", loss, step)
        writer.add_scalar("images_per_second", throughput + step, step)
    writer.close()
    if mtime is not None:
        for events in folder.glob("events.out.tfevents.*"):
            os.utime(events, (mtime, mtime))


def test_a_resumed_run_is_merged_by_step_and_the_later_launch_wins(tmp_path):
    log_run(tmp_path / "logs" / "first", {1: 0.9, 2: 0.8, 3: 0.7}, mtime=1_000)
    log_run(tmp_path / "logs" / "resumed", {3: 0.5, 4: 0.4}, mtime=2_000)  # re-logged step 3 after resuming
    scalars = read_scalars(tmp_path)
    assert scalars["loss"] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.8)), (3, pytest.approx(0.5)),
                               (4, pytest.approx(0.4))]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="No tensorboard event files"):
        read_scalars(tmp_path / "logs" / "missing")


def test_smoothing_is_debiased_and_checked():
    values = np.array([3.0, 1.0, 2.0])
    assert np.allclose(ema_smooth(values, 0.0), values)
    assert np.allclose(ema_smooth(np.full(5, 2.0), 0.9), 2.0)  # no pull towards zero at the start
    assert ema_smooth(values, 0.5)[1] == pytest.approx((0.5 * 3 + 1) / 1.5)
    with pytest.raises(ValueError, match="smoothing"):
        ema_smooth(values, 1.0)


def test_summary_is_the_mean_of_the_last_share_of_steps():
    scalars = {"loss": [(step, float(step)) for step in range(1, 21)], "images_per_second": [(1, 5.0), (2, 7.0), (3, 100.0)]}
    summary = summarise_run("run", scalars, tail_fraction=0.1)
    assert summary.steps == 20 and summary.final_loss == pytest.approx(19.5) and summary.median_images_per_second == 7
    with pytest.raises(KeyError, match="no 'loss'"):
        summarise_run("run", {"lr": [(1, 0.1)]})


def test_cli_plots_two_runs_and_prints_their_summaries(tmp_path, capsys):
    log_run(tmp_path / "a" / "logs", {step: 1.0 / step for step in range(1, 11)})
    log_run(tmp_path / "b" / "logs", {step: 2.0 for step in range(1, 11)}, throughput=50.0)
    plot = load_script(REPO / "eval" / "plot_training.py")
    plot.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "curves.png")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| a") or line.startswith("| b")]
    assert rows == ["| a | 10 | 0.1000 | 106 |", "| b | 10 | 2.0000 | 56 |"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="1 names for 2 runs"):
        plot.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--names", "x", "--output", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="repeats a name"):
        plot.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--names", "x", "x", "--output", str(tmp_path / "x.png")])


def test_cli_numbers_runs_whose_folders_share_a_name(tmp_path, capsys):
    """Two runs both called `emov2-5m` (different parent folders) stay two rows, not one silently merged."""
    log_run(tmp_path / "cpu" / "emov2-5m" / "logs", {step: 1.0 for step in range(1, 5)})
    log_run(tmp_path / "gpu" / "emov2-5m" / "logs", {step: 3.0 for step in range(1, 5)})
    plot = load_script(REPO / "eval" / "plot_training.py")
    plot.main(["--runs", str(tmp_path / "cpu" / "emov2-5m"), str(tmp_path / "gpu" / "emov2-5m"),
               "--output", str(tmp_path / "curves.png")])  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| emov2-5m")]
    assert rows == ["| emov2-5m-0 | 4 | 1.0000 | 102 |", "| emov2-5m-1 | 4 | 3.0000 | 102 |"]
