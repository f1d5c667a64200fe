#!/usr/bin/env python
r"""Where a denoiser's time goes: aten ops dispatched per forward, and the costliest ops by self CPU time.

    python eval/profile_ops.py --models emov2-5m unet2d-5m --batch_size 16 --resolution 32 --threads 1
    python eval/profile_ops.py --models emov2-5m --train     # forward + backward + AdamW step instead
    python eval/profile_ops.py --device cuda --batch_size 256 # self GPU time per op (kernels grouped by aten op)

The op count is exact (every aten call, views included: on a GPU at small sizes, latency follows it). Bytes moved
is the sum over non-view ops of their tensor inputs' and outputs' sizes: the memory traffic if no op found its
operands in cache, which a large batch approaches on a GPU (a 32² activation at batch 500 is hundreds of MB against
tens of MB of L2). It is split into convolutions/matmuls and everything else. The time table is `torch.profiler`'s
self CPU time per op (with `--device cuda`: self GPU time, plus a row for kernels launched outside aten ops),
averaged over `--repeats` runs after one warm-up. Minor page faults per run (memory the OS had to zero-fill; see
`emov2_gen.cpu_allocator`) are counted over as many unprofiled runs; compare them with
`--cpu_allocator retain` (opt-in; the default leaves malloc as the user has it).
"""

import argparse
import collections
import resource

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from emov2_gen.cpu_allocator import add_cpu_allocator_argument, apply_cpu_allocator
from emov2_gen.models.registry import DENOISER_PRESETS, build_denoiser


# Name parts of the aten ops counted as "convolutions/matmuls" (as dispatched: matmul and linear arrive as mm/addmm/
# bmm, scaled-dot-product attention as one of its *_attention kernels).
DENSE_OPS = ("convolution", "mm", "bmm", "addmm", "baddbmm", "attention")
# The GPU table's row for kernels that no aten op launched (the fused LayerNorm's Triton kernel).
OUTSIDE_ATEN = "kernels launched outside aten ops (Triton)"
# Ops that return a tensor sharing their input's storage without being marked as views.
NO_COPY_OPS = ("aten._unsafe_view",)
# Ops that take a tensor only for its dtype/device/shape: only their output is written.
FACTORY_OPS = tuple(f"aten.{op}" for op in ("new_zeros", "new_empty", "new_ones", "new_full", "empty_like",
                                            "zeros_like", "ones_like", "full_like"))  # fmt: skip


def _tensor_bytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if isinstance(t, torch.Tensor))


class _OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, and the bytes of the non-view ones' inputs and outputs, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] += 1
        out = func(*args, **(kwargs or {}))
        if not func.is_view and name not in NO_COPY_OPS:
            # An `out=` tensor is only written: it is counted once, as the output.
            read = (args, {key: value for key, value in (kwargs or {}).items() if key != "out"})
            inputs = 0 if name in FACTORY_OPS else _tensor_bytes(read)
            self.bytes[name] += inputs + _tensor_bytes(out)
        return out

    def dense_bytes(self) -> int:
        def dense(name: str) -> bool:
            return any(part in DENSE_OPS for part in name.split(".")[-1].split("_"))

        return sum(n for name, n in self.bytes.items() if dense(name))


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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--channels_last", action="store_true", help="Model and input in channels_last layout.")
    add_cpu_allocator_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, dict[str, float]]:
    """Print the op count, bytes moved, page faults and top ops per model.

    Returns {model: {"ops": count, "gigabytes": moved, "dense_gigabytes": moved by convolutions/matmuls,
    "page_faults": per run, "total_ms": self CPU (GPU with --device cuda) time per run, op name: ms per run}}.
    """
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_cpu_allocator(args.cpu_allocator)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU, and torch.cuda.is_available() is False here.")
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    on_gpu = device.type == "cuda"
    # Aten ops only (not the kernels they launch, listed again as events of their own), by self time on the device.
    time_of = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    results = {}
    for name in args.models:
        torch.manual_seed(0)
        model = build_denoiser(name, sample_size=args.resolution, in_channels=args.in_channels).train(args.train)
        model = model.to(device, memory_format=layout)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sample = torch.randn(args.batch_size, args.in_channels, args.resolution, args.resolution)
        sample = sample.to(device, memory_format=layout)
        timestep = torch.full((args.batch_size,), 10, device=device)

        def run() -> None:
            if not args.train:
                with torch.no_grad():
                    model(sample, timestep)
            else:
                model(sample, timestep).sample.square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            if on_gpu:
                torch.cuda.synchronize(device)

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
        averages = profile.key_averages()
        ops_events = [e for e in averages if e.device_type == torch.autograd.DeviceType.CPU]
        events = sorted(ops_events, key=lambda e: getattr(e, time_of), reverse=True)
        per_run_ms = {e.key: getattr(e, time_of) / 1e3 / args.repeats for e in events[: args.rows]}
        total_ms = sum(getattr(e, time_of) for e in events) / 1e3 / args.repeats
        if on_gpu:  # all kernels, also those launched outside aten ops (Triton's), which no aten op's row holds
            kernels = [e for e in averages if e.device_type != torch.autograd.DeviceType.CPU]
            kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / args.repeats
            per_run_ms[OUTSIDE_ATEN] = max(0.0, kernel_ms - total_ms)
            total_ms = max(total_ms, kernel_ms)
        ops = sum(counter.counts.values())
        gigabytes, dense_gigabytes = sum(counter.bytes.values()) / 1e9, counter.dense_bytes() / 1e9
        results[name] = {"ops": ops, "gigabytes": gigabytes, "dense_gigabytes": dense_gigabytes,
                         "page_faults": faults, "total_ms": total_ms, **per_run_ms}  # fmt: skip
        mode = "training step" if args.train else "forward"
        where = torch.cuda.get_device_name(device) if on_gpu else f"{torch.get_num_threads()} thread(s)"
        time_kind = "GPU" if on_gpu else "CPU"
        print(f"\n{name}: {ops} aten ops per forward, moving {gigabytes:.3g} GB ({dense_gigabytes:.3g} GB in "
              f"convolutions/matmuls, {gigabytes - dense_gigabytes:.3g} GB in other ops); {mode} at batch "
              f"{args.batch_size}, {args.resolution}², {where}: {total_ms:.1f} ms self {time_kind} time and "
              f"{faults:.0f} minor page faults per run")  # fmt: skip
        print("| op | calls per run | ms per run |\n|---|---|---|")
        calls = {e.key: f"{e.count / args.repeats:.0f}" for e in events}
        for key, ms in per_run_ms.items():
            print(f"| {key} | {calls.get(key, '-')} | {ms:.1f} |")
    return results


if __name__ == "__main__":
    main()
