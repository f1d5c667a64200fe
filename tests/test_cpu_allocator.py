"""retain_freed_cpu_memory: glibc stops handing freed activation memory back to the OS (no re-faulting)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from emov2_gen import cpu_allocator

# Rounds of MiB-sized tensors alive together (~31 MiB at peak, like a forward's activations), then all freed;
# prints the minor page faults of 20 rounds after 2 warm-up rounds.
PROBE = """
import resource, sys, torch
from emov2_gen.cpu_allocator import cpu_allocator_description, retain_freed_cpu_memory
retained = retain_freed_cpu_memory() if sys.argv[1] == "retain" else False
def rounds(n):
    for _ in range(n):
        live = [torch.ones(mib << 18) for mib in (1, 3, 6, 2, 5, 4, 6, 1, 3)]
        del live
rounds(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(20)
print(retained, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, cpu_allocator_description(), sep="|")
"""


def run_probe(mode: str) -> tuple[bool, int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    retained, faults, description = out.stdout.strip().splitlines()[-1].split("|")
    return retained == "True", int(faults), description


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_retaining_freed_memory_removes_the_page_faults_of_reallocation():
    retained, faults_retained, described_retained = run_probe("retain")
    _, faults_default, described_default = run_probe("default")
    assert retained
    assert faults_default > 100, "the probe should re-fault pages under glibc's default thresholds"
    assert faults_retained < faults_default / 10, (faults_retained, faults_default)
    assert described_retained.startswith("glibc malloc retaining freed memory (mmap threshold 32 MiB")
    assert described_default == "default malloc settings"


def test_description_names_allocator_environment_variables(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    assert cpu_allocator.cpu_allocator_description().endswith("environment MALLOC_TRIM_THRESHOLD_=1073741824")
