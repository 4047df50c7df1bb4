"""Download and convert every model's weights into MODELS_DIR (run at image build; needs the network).

    python scripts/fetch_weights.py MODELS_DIR [--mode base|fast] [--checkpoint FILE.pth]
    python scripts/fetch_weights.py MODELS_DIR --cutout-only --if-missing --offline-ok   (what `make run` runs)

InSPyReNet: the checkpoint named in transparent-background's own config.yaml (`base` mode:
ckpt_base.pth, 1024 px) is downloaded, its md5 checked against that config, and converted to
safetensors in the serving layout (MODELS_DIR/inspyrenet-swinb/model.safetensors + model.json).
`--checkpoint` converts a checkpoint already on disk instead of downloading (its md5 is still
checked). Files are written atomically; a failed run leaves no half-written weights behind.

`--cutout-only` skips the diffusion pipelines (about 13 GB; `make weights` fetches them).
`--if-missing` does nothing when the cutout weights are already in place. `--offline-ok` turns a
download that cannot reach the network into one line saying how to get test weights, and exit
status 0, so `make run` goes on to serve what works without them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effects.inspyrenet import MANIFEST_FILE, MODEL_DIR, MODEL_SIZES, ModelLoadError, check_weights, save_weights
from service.settings import get_settings

DOWNLOAD_ATTEMPTS = 3
CHUNK_BYTES = 1 << 20


class WeightsFetchError(RuntimeError):
    """A download, checksum or conversion failed; the message says which file and why."""


class DownloadUnreachable(WeightsFetchError):
    """The download never got an answer (no network, DNS, refused, timed out)."""


@dataclass(frozen=True)
class CheckpointSource:
    """Where transparent-background's config says a mode's checkpoint lives."""

    mode: str
    url: str
    md5: str | None
    filename: str
    base_size: int


def package_checkpoint_source(mode: str = "base") -> CheckpointSource:
    """The checkpoint URL, md5 and size for `mode`, from the installed transparent-background's config.yaml."""
    import yaml

    spec = importlib.util.find_spec("transparent_background")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsFetchError("transparent-background is not installed; pip install -r requirements.txt")
    config_path = Path(next(iter(spec.submodule_search_locations))) / "config.yaml"
    config: dict[str, Any] = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if mode not in config:
        raise WeightsFetchError(f"{config_path} has no mode {mode!r}; it has {sorted(config)}")
    entry = config[mode]
    base_size = int(entry["base_size"][0])
    if base_size != MODEL_SIZES.get(mode):
        raise WeightsFetchError(
            f"{config_path} says mode {mode!r} runs at {base_size} px, but the service expects {MODEL_SIZES.get(mode)}"
        )
    return CheckpointSource(mode, str(entry["url"]), entry.get("md5"), str(entry["ckpt_name"]), base_size)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    target: Path,
    *,
    attempts: int = DOWNLOAD_ATTEMPTS,
    quiet: bool = False,
    on_start: Callable[[int | None], None] | None = None,
) -> None:
    """Stream `url` to `target` (atomically), retrying transient failures.

    `on_start(content_length)` is called when the server starts answering. Raises
    DownloadUnreachable when no attempt got as far as an HTTP answer (offline),
    WeightsFetchError for any other failure.
    """
    partial = target.with_name(f".{target.name}.partial")
    last_error: Exception | None = None
    answered = False
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as handle:
                if not answered and on_start is not None:
                    length = response.headers.get("Content-Length")
                    on_start(int(length) if length and length.isdigit() else None)
                answered = True
                while chunk := response.read(CHUNK_BYTES):
                    handle.write(chunk)
            partial.replace(target)
            return
        except OSError as exc:  # URLError, HTTPError and socket timeouts are OSErrors
            last_error = exc
            answered = answered or isinstance(exc, urllib.error.HTTPError)
            if not quiet:
                print(f"download of {url} failed (attempt {attempt}/{attempts}): {exc}", file=sys.stderr)
            if attempt < attempts:
                time.sleep(2.0 * attempt)
        finally:
            partial.unlink(missing_ok=True)
    error = DownloadUnreachable if not answered else WeightsFetchError
    raise error(f"could not download {url} after {attempts} attempts: {last_error}") from last_error


def convert_checkpoint(
    checkpoint: Path, models_dir: Path, *, base_size: int, expected_md5: str | None, source: str
) -> Path:
    """Check a transparent-background `.pth` (md5, architecture) and write it in the serving layout.

    Returns the safetensors path. Raises WeightsFetchError naming the file on an md5
    mismatch, an unreadable checkpoint, or tensors that do not fit InSPyReNet_SwinB.
    """
    if expected_md5 is not None:
        actual = file_md5(checkpoint)
        if actual != expected_md5:
            raise WeightsFetchError(
                f"{checkpoint}: md5 {actual} does not match {expected_md5} from transparent-background's config; "
                "the download is corrupt or the release changed. Delete it and run again."
            )
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightsFetchError(f"{checkpoint} is not a readable torch checkpoint: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFetchError(f"{checkpoint} is not a state dict of tensors (got {type(state).__name__})")
    try:
        check_weights(checkpoint, state, base_size)
    except ModelLoadError as exc:
        raise WeightsFetchError(str(exc)) from exc
    return save_weights(state, models_dir, base_size, source=source)


def cutout_weights_present(models_dir: Path) -> bool:
    """The serving layout is complete: the manifest is written last, so its presence says so."""
    return (models_dir / MODEL_DIR / MANIFEST_FILE).is_file()


def fetch_inspyrenet(
    models_dir: Path,
    mode: str = "base",
    checkpoint: Path | None = None,
    *,
    attempts: int = DOWNLOAD_ATTEMPTS,
    quiet: bool = False,
    on_start: Callable[[int | None], None] | None = None,
) -> Path:
    """Download (unless `checkpoint` is given), verify and convert InSPyReNet; returns the safetensors path."""
    origin = package_checkpoint_source(mode)
    source = f"transparent-background {origin.filename} ({origin.url}), md5 {origin.md5}"
    if checkpoint is not None:
        return convert_checkpoint(
            checkpoint, models_dir, base_size=origin.base_size, expected_md5=origin.md5, source=source
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".download-") as scratch:
        downloaded = Path(scratch) / origin.filename
        download(origin.url, downloaded, attempts=attempts, quiet=quiet, on_start=on_start)
        return convert_checkpoint(
            downloaded, models_dir, base_size=origin.base_size, expected_md5=origin.md5, source=source
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models_dir", type=Path, help="where the service reads weights (CUTOUT_MODELS_DIR)")
    parser.add_argument("--mode", choices=sorted(MODEL_SIZES), default="base", help="transparent-background mode")
    parser.add_argument("--checkpoint", type=Path, default=None, help="convert this .pth instead of downloading it")
    parser.add_argument("--cutout-only", action="store_true", help="only InSPyReNet, not the diffusion pipelines")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when the cutout weights are in place")
    parser.add_argument(
        "--offline-ok", action="store_true", help="no network: say how to get test weights in one line, exit 0"
    )
    args = parser.parse_args(argv)

    if args.if_missing and args.checkpoint is None and cutout_weights_present(args.models_dir):
        if not args.cutout_only:
            return fetch_diffusion(args.models_dir)
        return 0
    started = time.perf_counter()

    def announce(length: int | None) -> None:
        size = f"{length / 1e6:.0f} MB" if length else "a few hundred MB"
        print(f"cutout: fetching the cutout weights ({size}, once) into {args.models_dir}/", file=sys.stderr)

    try:
        path = fetch_inspyrenet(
            args.models_dir,
            args.mode,
            args.checkpoint,
            attempts=1 if args.offline_ok else DOWNLOAD_ATTEMPTS,
            quiet=args.offline_ok,
            on_start=announce,
        )
    except DownloadUnreachable as exc:
        if not args.offline_ok:
            print(f"cutout: {exc}", file=sys.stderr)
            return 1
        print(
            f"cutout: offline ({_reason(exc)}), so no cutout weights in {args.models_dir}/: serving without "
            "background removal; `make test-weights` makes random test weights offline, `make weights` fetches "
            "the real ones",
            file=sys.stderr,
        )
        return 0
    except WeightsFetchError as exc:
        print(f"cutout: {exc}", file=sys.stderr)
        return 1
    print(f"cutout: InSPyReNet_SwinB ({args.mode}) -> {path} ({time.perf_counter() - started:.1f} s)")
    if args.cutout_only:
        return 0
    return fetch_diffusion(args.models_dir)


def _reason(exc: BaseException) -> str:
    """Why the download got no answer, short: `[Errno -3] Temporary failure in name resolution`."""
    cause = exc.__cause__ or exc
    reason = getattr(cause, "reason", cause)
    return str(reason) or reason.__class__.__name__


def fetch_diffusion(models_dir: Path) -> int:
    """Diffusion pipelines: fp16 safetensors via save_pretrained, ids from the service's settings."""
    settings = get_settings()
    if settings.diffusion_effects:
        from scripts.diffusion_weights import fetch_pipelines

        fetch_pipelines(
            models_dir,
            settings.diffusion_effects,
            {
                "upscale": settings.upscale_model,
                "enhance": settings.enhance_model,
                "comic": settings.comic_model,
                "aged": settings.aged_model,
            },
            vae_ids={"enhance": settings.enhance_vae},
        )

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
