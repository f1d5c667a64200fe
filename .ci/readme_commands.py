"""The README's two set-up commands, read from the README itself so CI runs exactly what a new user copies.

    python .ci/readme_commands.py main            # the main job, verbatim
    python .ci/readme_commands.py main --smoke D  # the same flags plus a few-step override, outputs under D
    python .ci/readme_commands.py test            # the test command, verbatim

The commands are the indented lines under "## Set-up on a fresh machine" that start with `pip install -e .`
(the main job) and `pip install -e ".[test]"` (the tests). The smoke version appends overrides to the training
and grid steps -- argparse keeps the last value of a repeated flag -- so every README flag is still parsed.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Set-up on a fresh machine"
MAIN_PREFIX = "pip install -e . &&"
TEST_PREFIX = 'pip install -e ".[test]" &&'
TRAIN_SCRIPT, GRID_SCRIPT = "train/train_ddpm.py", "eval/sample_grid.py"


def setup_commands(readme: str) -> dict[str, str]:
    """{"main": ..., "test": ...}: the indented command lines of the set-up section; raises if one is missing."""
    if SECTION not in readme:
        raise ValueError(f"README has no {SECTION!r} section")
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]
    found = {
        "main": [line for line in lines if line.startswith(MAIN_PREFIX)],
        "test": [line for line in lines if line.startswith(TEST_PREFIX)],
    }
    for name, matches in found.items():
        if len(matches) != 1:
            raise ValueError(f"expected one {name} command in the README's set-up section, found {len(matches)}")
    return {name: matches[0] for name, matches in found.items()}


def smoke_version(main_command: str, out_dir: str) -> str:
    """The main job with its training cut to a few steps and its outputs under `out_dir`."""
    run_dir, grid = shlex.quote(f"{out_dir}/run"), shlex.quote(f"{out_dir}/grid.png")
    overrides = {
        TRAIN_SCRIPT: f"--max_train_steps 4 --checkpointing_steps 2 --ddpm_num_inference_steps 2 --output_dir {run_dir}",
        GRID_SCRIPT: f"--model_dir {run_dir} --num_images 4 --num_inference_steps 2 --output {grid}",
    }
    steps = main_command.split(" && ")
    for script, extra in overrides.items():
        matching = [i for i, step in enumerate(steps) if script in step]
        if len(matching) != 1:
            raise ValueError(f"the main job should run {script} once, found {len(matching)} steps")
        steps[matching[0]] += " " + extra
    return " && ".join(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("main", "test"))
    parser.add_argument("--smoke", metavar="DIR", help="Main job at smoke size, outputs under DIR.")
    args = parser.parse_args()
    command = setup_commands(README.read_text())[args.which]
    print(smoke_version(command, args.smoke) if args.smoke and args.which == "main" else command)


if __name__ == "__main__":
    main()
