"""retain_freed_cpu_memory: an opt-in for the measuring scripts, applied only in the process that asks for it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from emov2_gen import cpu_allocator

# Run in a fresh interpreter: the setting changes the whole process, so it never runs inside the test process.
PROBE = """
import sys
from emov2_gen.cpu_allocator import apply_cpu_allocator, cpu_allocator_description
apply_cpu_allocator(sys.argv[1])
print(cpu_allocator_description())
"""


def describe(choice: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE, choice], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_retain_is_applied_only_when_asked_and_reported():
    assert describe("default") == "default malloc settings"
    assert describe("retain").startswith("glibc malloc retaining freed memory (mmap threshold 32 MiB, trim threshold")


def test_importing_the_library_and_the_scripts_leaves_malloc_alone():
    assert cpu_allocator.cpu_allocator_description().startswith("default malloc settings")  # in this test process


def test_the_scripts_default_to_the_users_allocator():
    import argparse

    parser = argparse.ArgumentParser()
    cpu_allocator.add_cpu_allocator_argument(parser)
    assert parser.parse_args([]).cpu_allocator == "default"


def test_description_names_allocator_environment_variables(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    assert cpu_allocator.cpu_allocator_description().endswith("environment MALLOC_TRIM_THRESHOLD_=1073741824")
