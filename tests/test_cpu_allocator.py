"""retain_freed_cpu_memory: glibc stops handing freed activation memory back to the OS (no re-faulting)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from emov2_gen import cpu_allocator

# Minor page faults per batch-16 forward of the EMOv2-1M UNet (after warm-up): the workload the setting is for.
# glibc's defaults re-fault thousands of pages per forward here in most processes (4k-37k measured; in some, none),
# retained memory a few hundred at most (0-450; Python's own arenas).
PROBE = """
import resource, sys, torch
from emov2_gen import build_denoiser
from emov2_gen.cpu_allocator import cpu_allocator_description, retain_freed_cpu_memory
torch.set_num_threads(1)
retained = retain_freed_cpu_memory() if sys.argv[1] == "retain" else False
torch.manual_seed(0)
model = build_denoiser("emov2-1m", sample_size=32).eval()
sample, timestep = torch.randn(16, 3, 32, 32), torch.full((16,), 10)
with torch.no_grad():
    for _ in range(2):
        model(sample, timestep)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        model(sample, timestep)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4
print(retained, faults, cpu_allocator_description(), sep="|")
"""


def run_probe(mode: str) -> tuple[bool, int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    retained, faults, description = out.stdout.strip().splitlines()[-1].split("|")
    return retained == "True", int(faults), description


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_retaining_freed_memory_removes_the_page_faults_of_a_forward():
    retained, faults_retained, described_retained = run_probe("retain")
    assert retained and faults_retained <= 1000, faults_retained
    assert described_retained.startswith("glibc malloc retaining freed memory (mmap threshold 32 MiB")
    # Under glibc's defaults, whether a forward's freed activations are trimmed off the heap top (and re-faulted
    # next time) depends on where small long-lived allocations happened to land: most processes re-fault thousands
    # of pages per forward, some (about 1 in 4 here) none. Up to five fresh processes, so the comparison does not
    # hinge on one heap layout.
    bar = 5 * max(faults_retained, 100)
    faults_default = []
    for _ in range(5):
        _, faults, described_default = run_probe("default")
        faults_default.append(faults)
        if faults > bar:
            break
    assert described_default == "default malloc settings"
    assert max(faults_default) > bar, (faults_retained, faults_default)


def test_description_names_allocator_environment_variables(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    assert cpu_allocator.cpu_allocator_description().endswith("environment MALLOC_TRIM_THRESHOLD_=1073741824")
