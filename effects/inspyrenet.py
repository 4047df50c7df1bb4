"""InSPyReNet (SwinB, from `transparent-background`) loaded for a fast cold start and run as tensor ops.

The reference is `transparent_background.Remover(mode=...).process(image)`: a PIL bilinear
resize to the model size, ImageNet normalisation, the network, a sigmoid, a min-max
normalisation, and a bilinear (align_corners=True) upsampling back to the photo's size.
`CutoutModel` does the same steps on the engine's device, for a batch, without PIL or
numpy in between, and without ever constructing `Remover` (whose constructor randomly
initialises the whole network, imports pymatting and may download weights).

Weights layout (written by `scripts/fetch_weights.py` and `scripts/make_test_weights.py`):

    MODELS_DIR/inspyrenet-swinb/model.safetensors   tensors + metadata (arch, base_size, digest)
    MODELS_DIR/inspyrenet-swinb/model.json          manifest with the `model_id` the engine reads

The network is built with its parameters on the `meta` device (no memory, no random
init), the safetensors file is memory-mapped and assigned into it, batch norms are folded
into their convolutions, and the result moves to the device once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from effects.base import MODEL_BUILD_LOCK

log = logging.getLogger("cutout.inspyrenet")

ARCH = "InSPyReNet_SwinB"
MODEL_DIR = "inspyrenet-swinb"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "model.json"
# transparent-background's modes: "fast" runs the network at 384 px, "base" at 1024 px.
MODEL_SIZES: dict[str, int] = {"fast": 384, "base": 1024}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Masks are cached as 16-bit PNGs at model resolution.
MASK_LEVELS = 65535

_FIX_WEIGHTS = "rebuild them with scripts/fetch_weights.py (or scripts/make_test_weights.py for random test weights)"


# Read errors that say nothing about the file itself (worth a retry); anything else is a broken file.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ENOMEM, errno.EBUSY})


class ModelLoadError(RuntimeError):
    """The cutout weights are missing, unreadable, or do not fit the architecture.

    The message names the file and the problem; the service shows it in `/ready`.
    """


# ---------------------------------------------------------------------------------------
# The architecture, imported without the package's __init__


_IMPORT_LOCK = threading.Lock()
_ARCHITECTURE: Callable[..., nn.Module] | None = None


def _architecture() -> Callable[..., nn.Module]:
    """`InSPyReNet_SwinB` from transparent-background, imported without `Remover`.

    The package's `__init__` imports `Remover` and the GUI (albumentations, torchvision
    transforms, wget, gdown, flet probing): seconds of cold start the serving path does not
    need. The architecture modules only need their own package to be importable, so a bare
    package object stands in for the duration of the import. A later ordinary
    `import transparent_background` still runs the real `__init__` and reuses these modules.

    The Swin backbone takes three small helpers from `timm.layers`, and importing timm imports
    torchvision's model zoo: 2-3 s of the cold start (more on busy cores) for a drop-path layer
    that is the identity in eval mode, a pair constructor and an initialiser. Unless timm is
    imported already, `_TimmLayers` stands in for it during the import (`timm` stays importable).
    """
    global _ARCHITECTURE
    with _IMPORT_LOCK:
        if _ARCHITECTURE is not None:
            return _ARCHITECTURE
        stand_in: types.ModuleType | None = None
        if "transparent_background" not in sys.modules:
            spec = importlib.util.find_spec("transparent_background")
            if spec is None or spec.submodule_search_locations is None:
                raise ModelLoadError(
                    "the transparent-background package is not installed (pip install transparent-background)"
                )
            stand_in = types.ModuleType("transparent_background")
            stand_in.__path__ = list(spec.submodule_search_locations)
            stand_in.__spec__ = spec
            sys.modules["transparent_background"] = stand_in
        timm_stand_ins = _timm_stand_ins() if "timm" not in sys.modules else {}
        sys.modules.update(timm_stand_ins)
        try:
            from transparent_background.InSPyReNet import InSPyReNet_SwinB
        finally:
            if stand_in is not None and sys.modules.get("transparent_background") is stand_in:
                del sys.modules["transparent_background"]
            for name, module in timm_stand_ins.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]
        architecture: Callable[..., nn.Module] = InSPyReNet_SwinB
        _ARCHITECTURE = architecture
        return architecture


class _DropPath(nn.Module):
    """Stochastic depth per sample (timm's `DropPath`): the identity in eval mode, which is how it serves."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask


def _to_2tuple(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value, value)


def _timm_stand_ins() -> dict[str, types.ModuleType]:
    """`timm` and `timm.layers` holding only what the Swin backbone imports from them."""
    package = types.ModuleType("timm")
    package.__path__ = []
    layers = types.ModuleType("timm.layers")
    layers.DropPath = _DropPath  # type: ignore[attr-defined]
    layers.to_2tuple = _to_2tuple  # type: ignore[attr-defined]
    layers.trunc_normal_ = torch.nn.init.trunc_normal_  # type: ignore[attr-defined]
    package.layers = layers  # type: ignore[attr-defined]
    return {"timm": package, "timm.layers": layers}


# Tensor constructors whose storage is about to be overwritten by the checkpoint. Constructors
# that compute values (torch.tensor, arange, linspace) stay real: Swin's constructor calls
# `.item()` on a linspace, and the image pyramid's Gaussian kernel and the attention index
# tables are computed there and must be correct.
_EMPTY_CONSTRUCTORS = frozenset({torch.empty, torch.zeros, torch.ones, torch.full})


class _ParametersOnMeta(TorchFunctionMode):
    """Allocate uninitialised tensors on `meta` while a module is being built.

    Like `with torch.device("meta")`, but only for allocators that the checkpoint overwrites,
    and thread-local (torch function modes are per thread), so models loading in parallel on
    other threads are not affected.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _EMPTY_CONSTRUCTORS and kwargs.get("device") is None:
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def build_inspyrenet(base_size: int, *, empty: bool) -> nn.Module:
    """The InSPyReNet_SwinB module for `base_size`, in eval mode, on the CPU.

    `empty=True` puts every parameter and buffer that the checkpoint provides on `meta`
    (for loading); `empty=False` runs the package's own random initialisation (for test
    weights; seed torch first for determinism).
    """
    make = _architecture()
    context = _ParametersOnMeta() if empty else contextlib.nullcontext()
    with MODEL_BUILD_LOCK, context, _quiet_meshgrid_warning():
        net = make(depth=64, pretrained=False, base_size=[base_size, base_size], threshold=None)
    net.eval()
    return net


@contextlib.contextmanager
def _quiet_meshgrid_warning() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        # Swin's constructor calls torch.meshgrid without `indexing`; the default is the one it wants.
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        yield


def _helper_kernels(net: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors the network keeps outside nn.Module bookkeeping (not in state_dict, not moved by .to)."""
    kernels: dict[str, torch.Tensor] = {}
    for name in ("image_pyramid", "transition0", "transition1", "transition2"):
        helper = getattr(net, name, None)
        kernel = getattr(helper, "kernel", None)
        if isinstance(kernel, torch.Tensor):
            kernels[f"{name}.kernel"] = kernel
    return kernels


def _move_helper_kernels(net: nn.Module, device: torch.device) -> None:
    for name in ("image_pyramid", "transition0", "transition1", "transition2"):
        helper = getattr(net, name, None)
        if helper is not None and isinstance(getattr(helper, "kernel", None), torch.Tensor):
            helper.kernel = helper.kernel.to(device)


# ---------------------------------------------------------------------------------------
# The weights file


@dataclass(frozen=True)
class WeightsInfo:
    """What the safetensors metadata says about the weights."""

    arch: str
    base_size: int
    weights_sha256: str
    source: str

    @property
    def model_id(self) -> str:
        return model_id_for(self.base_size, self.weights_sha256)


def model_id_for(base_size: int, weights_sha256: str) -> str:
    """Names the exact weights, so masks and results made with other weights never share a cache key."""
    return f"{MODEL_DIR}-{base_size}-{weights_sha256[:12]}"


def weights_path(models_dir: Path) -> Path:
    return models_dir / MODEL_DIR / WEIGHTS_FILE


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_weights(state_dict: Mapping[str, torch.Tensor], models_dir: Path, base_size: int, source: str) -> Path:
    """Write the weights and their manifest in the serving layout, atomically; returns the weights path.

    Shared by the download script and the random-weights script, so both produce exactly
    the same layout. The manifest is written last: its presence means the weights are complete.
    """
    if base_size not in MODEL_SIZES.values():
        raise ValueError(
            f"base_size must be one of {sorted(MODEL_SIZES.values())} (transparent-background's modes), got {base_size}"
        )
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    digest = weights_digest(tensors)
    info = WeightsInfo(arch=ARCH, base_size=base_size, weights_sha256=digest, source=source)
    directory = models_dir / MODEL_DIR
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / WEIGHTS_FILE
    metadata = {
        "format": "pt",
        "arch": info.arch,
        "base_size": str(info.base_size),
        "weights_sha256": info.weights_sha256,
        "source": info.source,
        "model_id": info.model_id,
    }
    partial = target.with_name(f".{target.name}.partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(target)
    manifest = {
        "model_id": info.model_id,
        "arch": info.arch,
        "base_size": info.base_size,
        "weights": WEIGHTS_FILE,
        "weights_sha256": info.weights_sha256,
        "source": info.source,
    }
    manifest_partial = directory / f".{MANIFEST_FILE}.partial"
    manifest_partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    manifest_partial.replace(directory / MANIFEST_FILE)
    return target


def read_weights_info(path: Path) -> WeightsInfo:
    """The metadata of a weights file; ModelLoadError when it is missing, unreadable or not ours."""
    if not path.is_file():
        raise ModelLoadError(f"cutout weights not found at {path}; {_FIX_WEIGHTS}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt: {_FIX_WEIGHTS}"
        ) from exc
    arch = metadata.get("arch")
    if arch != ARCH:
        raise ModelLoadError(
            f"{path} holds weights for {arch or 'an unnamed architecture'!r}, expected {ARCH!r}: {_FIX_WEIGHTS}"
        )
    size_text = metadata.get("base_size", "")
    if not size_text.isdigit() or int(size_text) not in MODEL_SIZES.values():
        raise ModelLoadError(
            f"{path} metadata base_size={size_text!r} is not one of {sorted(MODEL_SIZES.values())}: {_FIX_WEIGHTS}"
        )
    digest = metadata.get("weights_sha256", "")
    if len(digest) != 64:
        raise ModelLoadError(f"{path} metadata has no weights_sha256 digest: {_FIX_WEIGHTS}")
    return WeightsInfo(arch=arch, base_size=int(size_text), weights_sha256=digest, source=metadata.get("source", ""))


def _check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Strict: every tensor present, nothing extra, right shapes and kinds; the message lists what is wrong."""
    problems: list[str] = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_some(unexpected)}")
    wrong_shape = [
        f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(expected[name].shape)}"
        for name in sorted(set(tensors) & set(expected))
        if tensors[name].shape != expected[name].shape
    ]
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} wrong shape(s): {_some(wrong_shape)}")
    wrong_kind = [
        f"{name} is {tensors[name].dtype}, expected {expected[name].dtype}"
        for name in sorted(set(tensors) & set(expected))
        if tensors[name].is_floating_point() != expected[name].is_floating_point()
        or (not expected[name].is_floating_point() and tensors[name].dtype != expected[name].dtype)
    ]
    if wrong_kind:
        problems.append(f"{len(wrong_kind)} wrong dtype(s): {_some(wrong_kind)}")
    if problems:
        raise ModelLoadError(f"{path} does not fit {ARCH}: " + "; ".join(problems) + f". {_FIX_WEIGHTS}")


def check_weights(source: Path, tensors: Mapping[str, torch.Tensor], base_size: int) -> None:
    """Raise ModelLoadError unless `tensors` is exactly an InSPyReNet_SwinB state dict (names, shapes, kinds)."""
    _check_against(source, tensors, build_inspyrenet(base_size, empty=True).state_dict())


def _check_against(path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    _check_tensors(path, tensors, expected)
    # Index tables computed by the constructor must agree with the file's (a wrong index is
    # an out-of-bounds gather on the GPU, which kills the CUDA context instead of raising).
    for name, computed in expected.items():
        is_index = name.endswith("relative_position_index") and not computed.is_meta
        if is_index and not torch.equal(computed, tensors[name]):
            raise ModelLoadError(f"{path}: {name} does not match the Swin window layout: {_FIX_WEIGHTS}")


def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------
# Loading


def load_cutout_model(
    path: Path, device: torch.device, dtype: torch.dtype, *, compile_model: bool = False
) -> CutoutModel:
    """Load the cutout model from a safetensors file onto `device`.

    `dtype` is the weights' dtype on the device: float16 on CUDA (the forward runs under
    fp16 autocast), float32 on the CPU. `compile_model` wraps the network in
    `torch.compile` on CUDA; it is ignored (with a log line) on the CPU, where compiling
    costs far more than it saves.
    """
    path = Path(path)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    _architecture()
    timings["import_s"], clock = time.perf_counter() - clock, time.perf_counter()
    info = read_weights_info(path)
    net = build_inspyrenet(info.base_size, empty=True)
    expected = net.state_dict()
    timings["build_s"], clock = time.perf_counter() - clock, time.perf_counter()
    try:
        tensors = load_file(str(path), device="cpu")
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:  # the file may be fine; the read was not
            raise
        raise ModelLoadError(f"{path} could not be read ({exc}): {_FIX_WEIGHTS}") from exc
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{path} could not be read ({exc}); it may be truncated or corrupt: {_FIX_WEIGHTS}"
        ) from exc
    timings["weight_read_s"], clock = time.perf_counter() - clock, time.perf_counter()
    _check_against(path, tensors, expected)
    floats = {
        name: (t.float() if t.is_floating_point() and t.dtype != torch.float32 else t) for name, t in tensors.items()
    }
    with MODEL_BUILD_LOCK:  # assigning (and folding) parameters goes through register_parameter too
        net.load_state_dict(floats, strict=True, assign=True)
        _check_materialised(path, net)
        net.requires_grad_(False)
        _fold_batch_norms(net)
    timings["assign_s"], clock = time.perf_counter() - clock, time.perf_counter()
    # InSPyReNet overrides .to() with a device-only signature; the base method takes both at once.
    nn.Module.to(net, device=device, dtype=dtype)
    _move_helper_kernels(net, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["device_copy_s"] = time.perf_counter() - clock
    model = CutoutModel(net, info, device, dtype, compile_model=compile_model)
    model.load_timings = {name: round(seconds, 4) for name, seconds in timings.items()}
    model.weight_file_bytes = path.stat().st_size
    return model


def _check_materialised(path: Path, net: nn.Module) -> None:
    """Nothing may stay on `meta` after loading: parameters, buffers, or the helper kernels."""
    left = [name for name, p in net.named_parameters() if p.is_meta]
    left += [name for name, b in net.named_buffers() if b.is_meta]
    left += [name for name, k in _helper_kernels(net).items() if k.is_meta]
    if left:
        raise ModelLoadError(f"{path}: {len(left)} tensor(s) were never loaded: {_some(left)}")


def _fold_batch_norms(net: nn.Module) -> None:
    """Fold every eval-mode batch norm into the convolution before it (one op instead of two).

    transparent-background's `Conv2d` wrapper runs `conv` then `bn`; in eval mode the batch
    norm is an affine map per channel, which the convolution's weight and bias absorb exactly
    (up to float rounding).
    """
    for module in net.modules():
        conv = getattr(module, "conv", None)
        norm = getattr(module, "bn", None)
        if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.BatchNorm2d):
            continue
        if norm.running_mean is None or norm.running_var is None:
            continue
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias, requires_grad=False)
        module.register_module("bn", None)


# ---------------------------------------------------------------------------------------
# The model


_Saliency = Callable[[torch.Tensor], dict[str, list[torch.Tensor]]]


def _saliency_function(net: nn.Module) -> _Saliency:
    """InSPyReNet's pyramid forward: a dict whose "saliency" list ends with the full-size logits."""
    return cast(_Saliency, net.forward_inspyre)


class CutoutModel:
    """The loaded network plus the exact pre- and post-processing of `Remover.process`.

    All methods take and return tensors on `device`. `prepare` and `to_alpha` run per image;
    `forward` runs a batch (the engine's micro-batches).
    """

    def __init__(
        self,
        net: nn.Module,
        info: WeightsInfo,
        device: torch.device,
        dtype: torch.dtype,
        *,
        compile_model: bool = False,
    ) -> None:
        self.net = net
        self.info = info
        # Where `load_cutout_model` spent its time (seconds per phase) and the bytes it read.
        self.load_timings: dict[str, float] = {}
        self.weight_file_bytes = 0
        self.model_id = info.model_id
        self.base_size = info.base_size
        self.device = device
        self.dtype = dtype
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(3, 1, 1)
        self._saliency = _saliency_function(net)
        self.compiled = False
        if compile_model and device.type == "cuda":
            self._saliency = cast(_Saliency, torch.compile(self._saliency))
            self.compiled = True
        elif compile_model:
            log.warning("compile_model is ignored on %s: torch.compile only pays off on CUDA", device)

    @property
    def resident_bytes(self) -> int:
        tensors = [*self.net.parameters(), *self.net.buffers(), *_helper_kernels(self.net).values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 on the device → (3, S, S) float32 network input, as `Remover` makes it.

        `Remover` resizes a PIL image with `Image.BILINEAR` (a triangle filter widened by the
        downscale factor, i.e. antialiased; 8-bit result) and then normalises with the
        ImageNet mean and std.
        """
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"prepare expects a (3, H, W) uint8 image, got {tuple(image.shape)} {image.dtype}")
        size = self.base_size
        with torch.inference_mode():
            batch = image.unsqueeze(0)
            if tuple(image.shape[1:]) == (size, size):
                resized = batch.to(torch.float32)
            else:
                resized = resize_like_pil(batch, size, size)
            return resized[0].div_(255.0).sub_(self._mean).div_(self._std)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) network inputs → (N, 1, S, S) float32 subject probabilities in [0, 1].

        The sigmoid and min-max normalisation are `InSPyReNet.forward_inference`'s, but per
        image: the reference normalises over the whole batch, which would make one image's
        mask depend on the others in its micro-batch.
        """
        if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != (self.base_size, self.base_size):
            raise ValueError(
                f"forward expects (N, 3, {self.base_size}, {self.base_size}) inputs from prepare(), "
                f"got {tuple(batch.shape)}"
            )
        probability = self._sigmoid_saliency(batch)
        low = probability.amin(dim=(1, 2, 3), keepdim=True)
        high = probability.amax(dim=(1, 2, 3), keepdim=True)
        return (probability - low) / (high - low + 1e-8)

    def _sigmoid_saliency(self, batch: torch.Tensor) -> torch.Tensor:
        """The network's last saliency map through a float32 sigmoid (fp16 autocast on CUDA)."""
        with torch.inference_mode():
            autocast = (
                torch.autocast("cuda", dtype=torch.float16)
                if self.device.type == "cuda" and self.dtype != torch.float32
                else contextlib.nullcontext()
            )
            with autocast:
                logits = self._saliency(batch)["saliency"][-1]
            return torch.sigmoid(logits.to(torch.float32))

    def to_alpha(self, prob: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, 1, S, S) probabilities → (N, 1, height, width) alpha, upsampled as `Remover` does."""
        with torch.inference_mode():
            return F.interpolate(prob.to(torch.float32), size=(height, width), mode="bilinear", align_corners=True)

    def warm_up(self, size: int | None = None) -> float:
        """One real forward through every layer; returns the mask's mean (ModelLoadError if not finite).

        `size` defaults to the model size on CUDA (kernels chosen and memory reserved for the
        real shape) and to 64 px on the CPU, where a forward at 1024 px takes tens of seconds
        and warms nothing that a small one does not: the network runs at any multiple of 32.
        """
        if size is None:
            size = self.base_size if self.device.type == "cuda" else 64
        if size % 32:
            raise ValueError(f"warm-up size must be a multiple of 32, got {size}")
        probe = torch.zeros((1, 3, size, size), dtype=torch.float32, device=self.device)
        mask = self._sigmoid_saliency(probe)
        if not bool(torch.isfinite(mask).all()):
            raise ModelLoadError(
                f"{self.model_id}: the warm-up forward produced non-finite values; the weights are broken"
            )
        return float(mask.mean())


def resize_like_pil(batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, h, w) uint8 → (N, C, height, width) float32 holding the 8-bit values of PIL's BILINEAR resize.

    PIL resamples with a triangle filter stretched by the downscale factor (antialiased),
    fixed-point weights, in two 8-bit passes. On the CPU torch's uint8 antialiased kernel is
    written to match it; other devices have no uint8 kernel, so the float one is used and
    rounded to 8 bits. Either differs from PIL by at most one level, on some pixels.
    """
    if batch.device.type == "cpu":
        resized = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return resized.to(torch.float32)
    return _resize_float(batch, height, width)


def _resize_float(batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    resized = F.interpolate(
        batch.to(torch.float32), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.round_().clamp_(0.0, 255.0)


# ---------------------------------------------------------------------------------------
# Mask quantisation (the mask cache stores 16-bit PNGs at model resolution)


def quantise_mask(prob: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] → uint16 levels, as stored in the mask cache."""
    return prob.to(torch.float32).clamp(0.0, 1.0).mul(MASK_LEVELS).round_().to(torch.uint16)


def dequantise_mask(levels: torch.Tensor) -> torch.Tensor:
    """uint16 levels from the mask cache → float32 probabilities in [0, 1]."""
    return levels.to(torch.float32).div_(MASK_LEVELS)
