"""Keep freed CPU memory in the process, so that models with large temporaries stop page-faulting on every call.

glibc serves large allocations with fresh mmap'd pages and hands free memory at the top of the heap back to the
OS, both above thresholds that move with what was freed before (128 KiB rising to at most 32 MiB). A network whose
activations are megabytes each therefore re-faults (zero-fills) its pages on every forward: the EMOv2-5M UNet took
thousands to tens of thousands of minor page faults per batch-16 forward at 32x32, varying with the heap's layout
(in an occasional process none; `eval/profile_ops.py --cpu_allocator default` prints them), and because the
thresholds drift, a model's speed also depended on which models had run earlier in the same process. Fixing both
thresholds -- what jemalloc or tcmalloc, recommended by PyTorch's CPU performance guide, do in effect -- removes the
faults. The price: the process keeps its peak heap (and up to 1 GiB of free memory) instead of returning it.
Equivalent without code, set before Python starts:
`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD_BYTES = 32 << 20  # the largest value glibc accepts on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30
_ENV_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")
_retained = False


def retain_freed_cpu_memory() -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process; False (nothing changed) where libc is not glibc."""
    global _retained
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # mallopt returns 1 on success; musl's is a stub that returns 0.
    _retained = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _retained


def cpu_allocator_description() -> str:
    """How this process allocates CPU memory, for benchmark reports."""
    knobs = [f"{name}={os.environ[name]}" for name in _ENV_KNOBS if os.environ.get(name)]
    base = (
        f"glibc malloc retaining freed memory (mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, trim threshold "
        f"{TRIM_THRESHOLD_BYTES >> 20} MiB)" if _retained else "default malloc settings"
    )
    return base + (f"; environment {', '.join(knobs)}" if knobs else "")


def add_cpu_allocator_argument(parser: argparse.ArgumentParser) -> None:
    """`--cpu_allocator default|retain` for the measuring scripts; apply it with `apply_cpu_allocator`.

    'default' is the default: speed is reported as a user gets it. 'retain' is an opt-in environment tuning that
    changes the process (every later allocation in it), so it is never applied on import or inside a library call.
    """
    parser.add_argument(
        "--cpu_allocator", choices=("default", "retain"), default="default",
        help="default: leave malloc as it is (the user's environment). retain: fix glibc's malloc thresholds so "
        "freed memory is reused instead of re-faulted, which also makes each model's timing independent of the "
        "models run before it (emov2_gen.cpu_allocator; a tip that helps every model, not a model's own speed).",
    )


def apply_cpu_allocator(choice: str) -> None:
    """Act on `--cpu_allocator`; says so when 'retain' cannot be applied."""
    if choice == "retain" and not retain_freed_cpu_memory():
        print("Could not set glibc's malloc thresholds (not glibc?); measuring with the default allocator.")
