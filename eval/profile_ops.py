#!/usr/bin/env python
r"""Where a denoiser's time goes: aten ops dispatched per forward, and the costliest ops by self CPU time.

    python eval/profile_ops.py --models emov2-5m unet2d-5m --batch_size 16 --resolution 32 --threads 1
    python eval/profile_ops.py --models emov2-5m --train     # forward + backward + AdamW step instead

The op count is exact (every aten call, views included: on a GPU at small sizes, latency follows it). The time
table is `torch.profiler`'s self CPU time per op, averaged over `--repeats` runs after one warm-up. Minor page
faults per run (memory the OS had to zero-fill; see `emov2_gen.cpu_allocator`) are counted over as many unprofiled
runs; compare them with `--cpu_allocator default`.
"""

import argparse
import collections
import resource

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from emov2_gen.cpu_allocator import add_cpu_allocator_argument, apply_cpu_allocator
from emov2_gen.models.registry import DENOISER_PRESETS, build_denoiser


class _OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["emov2-5m", "unet2d-5m"], choices=sorted(DENOISER_PRESETS))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--in_channels", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="Profile a training step instead of a forward.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12, help="Ops listed per model.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    add_cpu_allocator_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, dict[str, float]]:
    """Print the op count, page faults and top ops per model; return {model: {"ops": count, "page_faults": per run, op name: ms per run}}."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_cpu_allocator(args.cpu_allocator)
    results = {}
    for name in args.models:
        torch.manual_seed(0)
        model = build_denoiser(name, sample_size=args.resolution, in_channels=args.in_channels).train(args.train)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sample = torch.randn(args.batch_size, args.in_channels, args.resolution, args.resolution)
        timestep = torch.full((args.batch_size,), 10)

        def run() -> None:
            if not args.train:
                with torch.no_grad():
                    model(sample, timestep)
                return
            model(sample, timestep).sample.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

        with torch.no_grad(), _OpCounter() as counter:
            model(sample, timestep)
        run()  # warm-up
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(args.repeats):
            run()
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / args.repeats
        with torch.profiler.profile() as profile:
            for _ in range(args.repeats):
                run()
        events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        per_run_ms = {e.key: e.self_cpu_time_total / 1e3 / args.repeats for e in events[: args.rows]}
        total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / args.repeats
        ops = sum(counter.counts.values())
        results[name] = {"ops": ops, "page_faults": faults, "total_ms": total_ms, **per_run_ms}
        mode = "training step" if args.train else "forward"
        print(f"\n{name}: {ops} aten ops per forward; {mode} at batch {args.batch_size}, {args.resolution}², "
              f"{torch.get_num_threads()} thread(s): {total_ms:.1f} ms self CPU time and {faults:.0f} minor page faults per run")
        print("| op | calls per run | ms per run |\n|---|---|---|")
        calls = {e.key: e.count / args.repeats for e in events}
        for key, ms in per_run_ms.items():
            print(f"| {key} | {calls[key]:.0f} | {ms:.1f} |")
    return results


if __name__ == "__main__":
    main()
