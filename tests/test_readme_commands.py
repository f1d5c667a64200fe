"""The README's set-up commands as CI reads them (.ci/readme_commands.py), and every script's --help."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from script_runs import load_script

ROOT = Path(__file__).resolve().parents[1]
readme_commands = load_script(ROOT / ".ci" / "readme_commands.py")


def flags(step: str) -> list[str]:
    return [token for token in shlex.split(step) if token.startswith("--")]


def test_the_readme_has_both_set_up_commands_and_the_smoke_run_keeps_every_flag():
    commands = readme_commands.setup_commands((ROOT / "README.md").read_text())
    main, test = commands["main"], commands["test"]
    assert main.startswith("pip install -e . && accelerate launch train/train_ddpm.py ")
    assert "python eval/sample_grid.py" in main
    assert "python -m pytest" in test and "HF_HUB_OFFLINE=1" in test
    smoke = readme_commands.smoke_version(main, "/tmp/out dir")
    for original, smoked in zip(main.split(" && "), smoke.split(" && ")):
        assert smoked.startswith(original)  # the README's step verbatim, overrides after it
    train = shlex.split(smoke.split(" && ")[1])
    assert train[-8:] == [
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--ddpm_num_inference_steps", "2",
        "--output_dir", "/tmp/out dir/run",
    ]
    # The overrides parse with the training script's own parser, the last value winning.
    train_ddpm = load_script(ROOT / "train" / "train_ddpm.py")
    args = train_ddpm.parse_args(train[train.index("train/train_ddpm.py") + 1:])
    assert (args.max_train_steps, args.output_dir, args.model) == (4, "/tmp/out dir/run", "emov2-1m")


def test_ci_runs_the_readme_test_command_verbatim():
    test = readme_commands.setup_commands((ROOT / "README.md").read_text())["test"]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines


@pytest.mark.parametrize(
    ("readme", "message"),
    [
        ("# x\n", "section"),
        ("## Set-up on a fresh machine\n\n    pip install -e . && a\n\n## Next\n", "one test command"),
        ("## Set-up on a fresh machine\n\n    pip install -e . && a\n    pip install -e . && b\n", "one main command"),
    ],
)
def test_a_readme_without_exactly_one_of_each_command_is_an_error(readme, message):
    with pytest.raises(ValueError, match=message):
        readme_commands.setup_commands(readme)


def test_the_smoke_run_needs_the_training_and_grid_steps():
    with pytest.raises(ValueError, match="sample_grid"):
        readme_commands.smoke_version("pip install -e . && accelerate launch train/train_ddpm.py --x 1", "/tmp")


@pytest.mark.usefixtures("one_thread")
def test_the_quickstart_runs_as_written(tmp_path, monkeypatch):
    """The README's Quickstart block, executed verbatim (in a temporary folder, where it saves its pipeline)."""
    section = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md#quickstart", "exec"), namespace)
    assert len(namespace["images"]) == 4 and (tmp_path / "my-pipeline" / "model_index.json").is_file()
    assert type(namespace["pipe"].unet).__name__ == "EMOv2UNet2DModel" and namespace["pipe"].unet.dtype == torch.bfloat16


SCRIPTS = sorted(
    path for folder in ("train", "eval") for path in (ROOT / folder).glob("*.py") if "def parse_args" in path.read_text()
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_script_prints_its_help(script, capsys):
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
