"""Benchmark library and CLIs: FLOP counting by hand, memory peaks, interleaving, report contents."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from emov2_gen.evaluation.benchmark import (
    BenchmarkSettings,
    NullClassDenoiser,
    _interleaved_seconds,
    benchmark_metrics,
    environment_info,
    peak_memory_mib,
    run_benchmark,
)
from emov2_gen.evaluation.flops import count_gflops
from emov2_gen.layers.fused_norm import fused_norm_enabled
from emov2_gen.models.registry import build_denoiser
from script_runs import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # shared fixture (conftest): one torch thread for this module


def eval_script(name: str):
    return load_script(REPO_ROOT / "eval" / f"{name}.py")


class ConvAttention(nn.Module):
    """A 1x1 conv, then single-head self-attention over the pixels: FLOPs are easy to count by hand."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=1)

    def forward(self, sample, timestep, class_labels=None):
        hidden = self.conv(sample)
        tokens = hidden.flatten(2).transpose(1, 2)[:, None]  # (B, 1, H*W, C), equal q/k/v widths
        return F.scaled_dot_product_attention(tokens, tokens, tokens)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_count_gflops_matches_hand_count(batch_size):
    in_channels, channels, height, width = 3, 8, 4, 6
    tokens = height * width
    conv = 2 * in_channels * channels * tokens  # one multiply-add per weight and pixel
    attention = 2 * (tokens * tokens * channels) * 2  # QK^T and AV
    gflops = count_gflops(ConvAttention(in_channels, channels), (height, width), in_channels, batch_size=batch_size)
    assert gflops * 1e9 == pytest.approx(conv + attention)


def test_count_gflops_passes_class_labels_and_rejects_bad_batch():
    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, num_class_embeds=4,
    )
    assert count_gflops(model, 8, 1) > 0
    with pytest.raises(ValueError, match="batch_size"):
        count_gflops(model, 8, 1, batch_size=0)


def test_peak_memory_counts_the_largest_live_set():
    def run():
        big = torch.ones(8 * 2**20 // 4)  # 8 MiB of float32
        del big
        small = torch.ones(2 * 2**20 // 4)
        other = torch.ones(2 * 2**20 // 4)  # 4 MiB live together
        return small, other

    assert peak_memory_mib(run, torch.device("cpu")) == pytest.approx(8.0, abs=0.1)


def test_measurements_are_interleaved_round_robin():
    calls = []
    cases = {
        metric: {model: (lambda m=model, k=metric: calls.append((k, m))) for model in ("a", "b")}
        for metric in ("x", "y")
    }
    timings = _interleaved_seconds(cases, repeats=2, warmup=1, device=torch.device("cpu"), description="test")
    assert calls == [("x", "a"), ("x", "b"), ("y", "a"), ("y", "b")] * 3
    assert {model: {metric: len(t) for metric, t in per.items()} for model, per in timings.items()} == {
        "a": {"x": 2, "y": 2},
        "b": {"x": 2, "y": 2},
    }


def tiny_unet2d(sample_size: int) -> UNet2DModel:
    return UNet2DModel(
        sample_size=sample_size, block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def test_inference_is_timed_before_any_training_step():
    """Training steps leave the CPU heap holding their freed activations, which slowed later inference: every
    forward and sampling call must come first (the peak-memory steps follow: per model, train then forward)."""
    modes = []

    def recorded_unet2d(sample_size: int) -> UNet2DModel:
        model = tiny_unet2d(sample_size)
        model.register_forward_pre_hook(lambda module, args: modes.append("T" if module.training else "I"))
        return model

    settings = BenchmarkSettings(resolutions=(16,), batch_sizes=(1,), train_resolution=16, train_batch_size=1,
                                 sampling_batch_size=1, sampling_steps=2, repeats=2, sampling_repeats=1)
    run_benchmark({"a": recorded_unet2d, "b": recorded_unet2d}, baseline="a", settings=settings)
    timed, peak_memory = "".join(modes[:-4]), "".join(modes[-4:])
    assert re.fullmatch(r"I+T+", timed), timed
    assert timed.count("T") == 2 * (settings.warmup + settings.repeats)
    assert peak_memory == "TITI"


class OneConv(ModelMixin, ConfigMixin):
    """A denoiser of one k x k conv (3 -> 3 channels): its parameters and FLOPs are known by hand."""

    @register_to_config
    def __init__(self, sample_size: int = 16, in_channels: int = 3, kernel_size: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        return UNet2DOutput(sample=self.conv(sample))


def test_report_values_and_ratios_match_hand_counts_and_the_raw_timings(tmp_path):
    settings = BenchmarkSettings(
        resolutions=(16,), batch_sizes=(1, 2), train_resolution=16, train_batch_size=2,
        sampling_batch_size=2, sampling_steps=2, repeats=3, sampling_repeats=2,
    )
    builders = {"conv1": lambda size: OneConv(size, kernel_size=1), "conv3": lambda size: OneConv(size, kernel_size=3)}
    report = run_benchmark(builders, baseline="conv1", settings=settings)

    keys = [metric.key for metric in benchmark_metrics(settings)]
    assert keys == [
        "parameters", "gflops_16px", "forward_ms_bs1_16px", "forward_ms_bs2_16px", "train_step_ms",
        "train_peak_mib", "forward_peak_mib", "sampling_images_per_s",
    ]
    for name in builders:
        assert list(report.values[name]) == keys
        assert all(math.isfinite(v) and v > 0 for v in report.values[name].values())
        assert len(report.timings_s[name]["train_step_ms"]) == 3
        assert len(report.timings_s[name]["sampling_images_per_s"]) == 2
    # By hand: k*k*3*3 weights + 3 biases; 2 FLOPs per weight and pixel of one 16x16 image.
    assert report.values["conv1"]["parameters"] == 9 + 3 and report.values["conv3"]["parameters"] == 81 + 3
    assert report.values["conv1"]["gflops_16px"] == pytest.approx(2 * 9 * 256 / 1e9)
    assert report.values["conv3"]["gflops_16px"] == pytest.approx(2 * 81 * 256 / 1e9)
    ratios = report.ratios()
    assert ratios["conv3"]["parameters"] == pytest.approx(84 / 12)
    assert ratios["conv3"]["gflops_16px"] == pytest.approx(9.0)
    model_s, base_s = (report.timings_s[name]["forward_ms_bs2_16px"] for name in ("conv3", "conv1"))
    assert report.values["conv3"]["forward_ms_bs2_16px"] == pytest.approx(1e3 * sorted(model_s)[1])
    paired = statistics.median(t / b for t, b in zip(model_s, base_s))  # repetition-wise ratios
    assert ratios["conv3"]["forward_ms_bs2_16px"] == pytest.approx(paired)
    model_s, base_s = (report.timings_s[name]["sampling_images_per_s"] for name in ("conv3", "conv1"))
    assert report.values["conv3"]["sampling_images_per_s"] == pytest.approx(2 / statistics.median(model_s))
    throughput_ratio = statistics.median(b / t for t, b in zip(model_s, base_s))  # higher is better: base / model time
    assert ratios["conv3"]["sampling_images_per_s"] == pytest.approx(throughput_ratio)

    json_path, md_path = report.save(tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert saved["baseline"] == "conv1"
    assert saved["environment"]["torch_threads"] == 1
    assert saved["environment"]["cpu_allocator"] in md_path.read_text()  # how memory was allocated, beside the table
    assert "inference (forwards, then sampling) timed before the training step" in md_path.read_text()
    assert [m["name"] for m in saved["models"]] == ["conv1", "conv3"]
    assert saved["models"][1]["class"] == "OneConv"
    assert saved["models"][1]["ratios"] == pytest.approx(ratios["conv3"])
    table = [line for line in md_path.read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(builders)
    assert table[0].count("|") == len(keys) + 2
    assert table[2].startswith("| conv1 |") and table[3].startswith("| conv3 | 0.00M (7.00x) | 4.15e-05 (9.00x) |")


def test_class_conditional_transformers_are_timed_and_sampled_on_their_null_class():
    """diffusers' DiT cannot run without labels: every call the benchmark makes (FLOP count, forwards, sampling,
    training step) passes the null class, the last label row, to DiT and to a class-conditional DEMO alike."""
    labels: dict[str, list[torch.Tensor]] = {"dit-t-2": [], "demo-t-2": []}

    def recorded(name: str, num_class_embeds: int):
        def build(sample_size: int) -> ModelMixin:
            model = build_denoiser(name, sample_size, in_channels=1, num_class_embeds=num_class_embeds)
            hook = lambda module, args, kwargs: labels[name].append(kwargs["class_labels"])  # noqa: E731
            model.register_forward_pre_hook(hook, with_kwargs=True)
            return model

        return build

    settings = BenchmarkSettings(resolutions=(8,), batch_sizes=(2,), train_resolution=8, train_batch_size=2,
                                 sampling_batch_size=3, sampling_steps=2, repeats=1, sampling_repeats=1, in_channels=1)
    report = run_benchmark({"dit-t-2": recorded("dit-t-2", 11), "demo-t-2": recorded("demo-t-2", 5)}, "dit-t-2", settings)
    assert {name: {tuple(t.tolist()) for t in calls} for name, calls in labels.items()} == {
        "dit-t-2": {(10,), (10, 10), (10, 10, 10)},  # the FLOP count, forwards and training (2), sampling (3)
        "demo-t-2": {(4,), (4, 4), (4, 4, 4)},
    }
    assert report.model_classes == {"dit-t-2": "DiTTransformer2DModel", "demo-t-2": "EMOv2Transformer2DModel"}
    for name in labels:
        assert all(math.isfinite(v) and v > 0 for v in report.values[name].values())
    dit = build_denoiser("dit-t-2", 8, in_channels=1, num_class_embeds=11)
    assert report.values["dit-t-2"]["parameters"] == dit.num_parameters()
    assert report.values["dit-t-2"]["gflops_8px"] == pytest.approx(count_gflops(NullClassDenoiser(dit), 8, 1))


def test_cuda_reports_say_whether_the_fused_layernorm_kernel_was_on(monkeypatch):
    """A/B runs of the kernel (EMOV2_GEN_FUSED_NORM=0) must be told apart by their reports; CPU reports omit it."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")  # no GPU needed
    with fused_norm_enabled(True):  # whatever EMOV2_GEN_FUSED_NORM says here
        assert environment_info(torch.device("cuda"))["fused_layernorm_kernel"] is True  # triton: a test dependency
    with fused_norm_enabled(False):
        env = environment_info(torch.device("cuda"))
    assert env["fused_layernorm_kernel"] is False
    assert "fused_layernorm_kernel" not in environment_info(torch.device("cpu"))

    settings = BenchmarkSettings(resolutions=(16,), batch_sizes=(1,), train_resolution=16, train_batch_size=1,
                                 sampling_batch_size=1, sampling_steps=1, repeats=1, sampling_repeats=1)
    report = run_benchmark({"tiny-unet2d": tiny_unet2d}, baseline="tiny-unet2d", settings=settings)
    report.environment = env
    assert "fused LayerNorm kernel: off." in report.to_markdown()


def test_unknown_baseline_and_bad_settings_raise():
    with pytest.raises(ValueError, match="baseline"):
        run_benchmark({"a": tiny_unet2d}, baseline="b", settings=BenchmarkSettings(resolutions=(16,), train_resolution=16))
    with pytest.raises(ValueError, match="dtype"):
        BenchmarkSettings(dtype="fp8")
    with pytest.raises(ValueError, match="train_resolution"):
        BenchmarkSettings(resolutions=(64,))


def run_benchmark_cli(output_dir: Path, *args: str) -> dict:
    """eval/benchmark.py --quick on one thread with `args`; returns its benchmark.json."""
    eval_script("benchmark").main([*args, "--quick", "--threads", "1", "--output_dir", str(output_dir)])
    return json.loads((output_dir / "benchmark.json").read_text())


def test_benchmark_cli_quick_adds_the_baseline(tmp_path, capsys):
    saved = run_benchmark_cli(tmp_path, "--models", "emov2-1m")
    printed = capsys.readouterr().out
    assert [m["name"] for m in saved["models"]] == ["unet2d-5m", "emov2-1m"]
    assert saved["settings"]["repeats"] == 2 and saved["settings"]["resolutions"] == [32]
    assert (tmp_path / "benchmark.md").read_text() in printed
    assert saved["environment"]["cpu_allocator"] == "default malloc settings"  # the user's allocator unless asked


def test_benchmark_cli_takes_batch_sizes_for_the_forward_and_sampling_columns(tmp_path, capsys):
    saved = run_benchmark_cli(tmp_path, "--models", "unet2d-5m", "--batch_sizes", "2", "3", "--sampling_batch_size", "2")
    assert saved["settings"]["batch_sizes"] == [2, 3] and saved["settings"]["sampling_batch_size"] == 2
    values = saved["models"][0]["values"]
    assert {"forward_ms_bs2_32px", "forward_ms_bs3_32px"} <= values.keys() and "forward_ms_bs4_32px" not in values
    assert "fwd bs3 32²" in capsys.readouterr().out and "DDIM-5 bs2" in (tmp_path / "benchmark.md").read_text()


def test_benchmark_cli_resolutions_set_the_forward_and_training_sizes(tmp_path):
    saved = run_benchmark_cli(tmp_path, "--models", "unet2d-5m", "--resolutions", "16", "8", "--batch_sizes", "1")
    assert saved["settings"]["resolutions"] == [16, 8] and saved["settings"]["train_resolution"] == 16
    values = saved["models"][0]["values"]
    assert {"forward_ms_bs1_16px", "forward_ms_bs1_8px"} <= values.keys() and "forward_ms_bs1_32px" not in values


def test_model_table_cli(tmp_path, capsys):
    out = tmp_path / "table.json"
    eval_script("model_table").main(["--models", "emov2-1m", "--sample_size", "16", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = {row["name"]: row for row in json.loads(out.read_text())["models"]}
    assert list(rows) == ["emov2-1m", "unet2d-5m"]
    emov2 = build_denoiser("emov2-1m", sample_size=16)
    assert rows["emov2-1m"]["parameters"] == sum(p.numel() for p in emov2.parameters())
    for key in ("parameters", "gflops_per_image"):  # ratios to the baseline row
        ratio = rows["emov2-1m"][key] / rows["unet2d-5m"][key]
        assert rows["emov2-1m"][key.split("_")[0] + "_ratio"] == pytest.approx(ratio)
    assert f"| emov2-1m | EMOv2UNet2DModel | {tuple(emov2.config.block_out_channels)} |" in printed


def test_model_table_lists_a_demo_transformer_by_depth_width_and_patch(capsys):
    model_table = eval_script("model_table")
    assert not any(name.startswith("demo-") for name in model_table.parse_args([]).models)
    model_table.main(["--models", "demo-s-2", "--baseline", "demo-s-2", "--sample_size", "8", "--in_channels", "4"])
    assert "| demo-s-2 | EMOv2Transformer2DModel | 12 x 384, patch 2 |" in capsys.readouterr().out


def test_model_table_and_benchmark_cli_put_dit_beside_demo(tmp_path, capsys):
    out = tmp_path / "table.json"
    args = ["--models", "demo-t-2", "dit-t-2", "--baseline", "dit-t-2", "--sample_size", "8", "--in_channels", "1"]
    eval_script("model_table").main([*args, "--num_class_embeds", "11", "--json", str(out)])
    rows = {row["name"]: row for row in json.loads(out.read_text())["models"]}
    assert rows["dit-t-2"]["parameters"] == build_denoiser("dit-t-2", 8, 1, num_class_embeds=11).num_parameters()
    assert rows["demo-t-2"]["parameters"] == build_denoiser("demo-t-2", 8, 1, num_class_embeds=11).num_parameters()
    assert all(row["gflops_per_image"] > 0 for row in rows.values())
    assert "| dit-t-2 | DiTTransformer2DModel | 6 x 128, patch 2 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="DiTTransformer2DModel is class-conditional"):
        eval_script("model_table").main(args)

    saved = run_benchmark_cli(
        tmp_path / "bench", "--models", "demo-t-2", "dit-t-2", "--baseline", "dit-t-2", "--in_channels", "1",
        "--num_class_embeds", "11", "--resolutions", "8", "--batch_sizes", "1", "--sampling_batch_size", "1",
    )
    assert [m["name"] for m in saved["models"]] == ["demo-t-2", "dit-t-2"]
    assert saved["models"][0]["values"]["parameters"] == rows["demo-t-2"]["parameters"]
    assert saved["models"][1]["values"]["gflops_8px"] == pytest.approx(rows["dit-t-2"]["gflops_per_image"])


def test_profile_ops_counts_ops_and_lists_the_costliest(capsys):
    profile_ops = eval_script("profile_ops")
    common = ["--models", "emov2-1m", "--batch_size", "1", "--resolution", "16", "--repeats", "1", "--rows", "5"]
    forward = profile_ops.main(common)["emov2-1m"]
    train = profile_ops.main(common + ["--train"])["emov2-1m"]
    assert forward["ops"] == train["ops"] > 100  # the count is of one forward either way
    assert "aten::mkldnn_convolution" in forward and "aten::convolution_backward" in train
    op_ms = {k: v for k, v in forward.items() if k not in ("ops", "gigabytes", "dense_gigabytes", "page_faults")}
    assert len(op_ms) == 1 + 5 and 0 < max(op_ms.values()) <= forward["total_ms"]
    assert forward["page_faults"] >= 0
    assert 0 < forward["dense_gigabytes"] < forward["gigabytes"] == train["gigabytes"]
    printed = capsys.readouterr().out
    assert f"emov2-1m: {forward['ops']} aten ops per forward, moving {forward['gigabytes']:.3g} GB" in printed
    assert "forward at batch 1, 16²" in printed
    assert "training step at batch 1" in printed
    assert f"{forward['page_faults']:.0f} minor page faults per run" in printed


def test_profile_ops_channels_last_profiles_the_same_forward(capsys):
    profile_ops = eval_script("profile_ops")
    common = ["--models", "emov2-1m", "--batch_size", "1", "--resolution", "16", "--repeats", "1", "--rows", "3"]
    contiguous = profile_ops.main(common)["emov2-1m"]
    channels_last = profile_ops.main(common + ["--channels_last"])["emov2-1m"]
    assert channels_last["gigabytes"] > 0 and channels_last["total_ms"] > 0
    # The same model; a channels-last input spares the first LayerNorm its layout copy.
    assert 0.9 * contiguous["ops"] < channels_last["ops"] < contiguous["ops"]


def test_gpu_scripts_refuse_clearly_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA GPU"):
        eval_script("profile_ops").main(["--device", "cuda", "--models", "emov2-1m"])
    with pytest.raises(SystemExit, match="CUDA GPU"):
        eval_script("fused_norm_check").main([])


def test_profile_ops_counts_the_bytes_of_copies_not_views():
    counter_type = eval_script("profile_ops")._OpCounter
    a, b, w = torch.ones(1000), torch.ones(1000), torch.ones(1000, 1000)
    with counter_type() as counter:
        a.view(10, 100)  # a view: no bytes
        a.new_zeros(())  # reads nothing of `a`, writes 4 bytes
        torch.add(a, b)  # two 4000-byte inputs, one 4000-byte output
        torch.mm(w, w[:, :1])  # 4 MB + 4 kB in, 4 kB out: a dense op
        torch.addcmul(b, a, b, out=a)  # reads three 4000-byte tensors, writes one (the out= tensor, once)
    assert counter.counts["aten.view"] == 1 and counter.bytes["aten.view"] == 0
    assert counter.bytes["aten.add"] == 12_000 and counter.bytes["aten.new_zeros"] == 4
    assert counter.bytes["aten.addcmul"] == 16_000
    assert counter.dense_bytes() == 4_000_000 + 4_000 + 4_000
