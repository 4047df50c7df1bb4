"""Every model's production weights, fetched and converted into MODELS_DIR (the image build; needs the network).

    python scripts/fetch_weights.py MODELS_DIR [--mode base|fast] [--checkpoint FILE.pth]
    python scripts/fetch_weights.py MODELS_DIR --cutout-only --if-missing --offline-ok   (what `make run` runs)
    python scripts/fetch_weights.py MODELS_DIR --effects comic --model comic=OWNER/REPO   (another Hub repository)

InSPyReNet: the checkpoint named in transparent-background's own config.yaml (`base` mode:
ckpt_base.pth, 1024 px) is downloaded, its md5 checked against that config, and converted to
safetensors in the serving layout (MODELS_DIR/inspyrenet-swinb/model.safetensors + model.json).
`--checkpoint` converts a checkpoint already on disk instead of downloading (its md5 is still
checked). Files are written atomically; a failed run leaves no half-written weights behind.

Diffusion pipelines: each registered diffusion effect's pipeline, from the Hub repository its registry
entry names (`DiffusionSpec.hub_id`, and `vae_hub_id` for a replacement VAE; `--model` / `--vae`
override one), converted to fp16 and saved with `save_pretrained` as plain safetensors in
MODELS_DIR/<effect>/, so the service loads local fp16 files and never needs a variant or the Hub. Each
pipeline is written into a temporary directory beside the target and renamed into place, then its
manifest (`model.json`: `model_id` naming the exact files, source, pipeline) is written last: a
pipeline directory with a manifest is complete.

`--cutout-only` skips the diffusion pipelines (about 13 GB; `make weights` fetches them).
`--if-missing` does nothing when the cutout weights are already in place. `--offline-ok` turns a
download that cannot reach the network into one line saying how to get test weights, and exit
status 0, so `make run` goes on to serve what works without them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from effects import DIFFUSION_EFFECTS, diffusion_spec
from effects.diffusion import disable_library_progress_bars
from effects.inspyrenet import MANIFEST_FILE, MODEL_DIR, MODEL_SIZES, ModelLoadError, check_weights, save_weights

log = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 3
CHUNK_BYTES = 1 << 20


# --- The cutout model (InSPyReNet) --------------------------------------------------------------


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
                log.warning("download of %s failed (attempt %d/%d): %s", url, attempt, attempts, exc)
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


# --- Diffusion pipelines -----------------------------------------------------------------------


def files_digest(directory: Path) -> str:
    """sha256 over every file of a pipeline directory (relative path, size, content), manifest excluded."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        relative = path.relative_to(directory).as_posix()
        digest.update(f"{relative}|{path.stat().st_size}\n".encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def save_pipeline(pipeline: Any, models_dir: Path, effect: str, source: str) -> Path:
    """`save_pretrained` as plain safetensors into MODELS_DIR/<effect>, atomically, manifest last."""
    spec = diffusion_spec(effect)
    disable_library_progress_bars()
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / effect
    partial = models_dir / f".{effect}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    pipeline.save_pretrained(str(partial), safe_serialization=True, variant=None)
    digest = files_digest(partial)
    if target.exists():
        shutil.rmtree(target)
    partial.replace(target)
    manifest = {
        "model_id": f"{effect}-{digest[:12]}",
        "pipeline": spec.pipeline_class_name,
        "files_sha256": digest,
        "source": source,
    }
    manifest_partial = target / f".{MANIFEST_FILE}.partial"
    manifest_partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    manifest_partial.replace(target / MANIFEST_FILE)
    return target


@contextmanager
def _online() -> Iterator[None]:
    # The image build is the one place that downloads; make sure an inherited offline flag does not
    # turn the fetch into a confusing "file not found".
    previous = os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        yield
    finally:
        if previous is not None:
            os.environ["HF_HUB_OFFLINE"] = previous


def _from_pretrained_fp16(pipeline_class: Any, model_id: str, **kwargs: Any) -> Any:
    """fp16 weights: the repository's fp16 variant where it has one, else its fp32 files converted on load."""
    try:
        return pipeline_class.from_pretrained(model_id, dtype=torch.float16, variant="fp16", **kwargs)
    except (OSError, ValueError) as exc:
        log.info("%s: no fp16 variant (%s); loading the default files as fp16", model_id, type(exc).__name__)
    return pipeline_class.from_pretrained(model_id, dtype=torch.float16, **kwargs)


def fetch_pipelines(
    models_dir: Path,
    effects: Sequence[str] = DIFFUSION_EFFECTS,
    model_ids: Mapping[str, str] | None = None,
    vae_ids: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Download each effect's pipeline and save it in the serving layout; returns each effect's directory.

    The pipeline comes from the Hub repository of the effect's registry entry (`spec.hub_id`), or from
    `model_ids[effect]` when given (a Hub id or a local directory). The VAE of `spec.vae_hub_id` (or
    `vae_ids[effect]`) replaces the pipeline's own: the SDXL refiner takes madebyollin/sdxl-vae-fp16-fix,
    whose decoder does not overflow in fp16. Every pipeline is saved in fp16 as plain safetensors, with
    the effect's scheduler class, without safety checker, feature extractor or watermarker.
    """
    import diffusers
    from diffusers import AutoencoderKL

    written: dict[str, Path] = {}
    with _online():
        for effect in effects:
            spec = diffusion_spec(effect)
            model_id = (model_ids or {}).get(effect, spec.hub_id)
            vae_id = (vae_ids or {}).get(effect, spec.vae_hub_id)
            started = time.perf_counter()
            components: dict[str, Any] = {}
            source = model_id
            if vae_id is not None:
                components["vae"] = AutoencoderKL.from_pretrained(vae_id, dtype=torch.float16)
                source = f"{model_id} + vae {vae_id}"
            pipeline_class = getattr(diffusers, spec.pipeline_class_name)
            pipeline = _from_pretrained_fp16(pipeline_class, model_id, **components, **spec.pipeline_options)
            pipeline.scheduler = getattr(diffusers, spec.scheduler).from_config(pipeline.scheduler.config)
            written[effect] = save_pipeline(pipeline, models_dir, effect, source=source)
            log.info("%s: %s -> %s (%.0f s)", effect, source, written[effect], time.perf_counter() - started)
            del pipeline, components
    return written


# --- Command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The command line of `scripts/fetch_weights.py`: progress and problems go to stderr, one line each
    (through this module's logger, so the functions above report the same way inside the service's logs)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        return _main(argv)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models_dir", type=Path, help="where the service reads weights (CUTOUT_MODELS_DIR)")
    parser.add_argument("--mode", choices=sorted(MODEL_SIZES), default="base", help="transparent-background mode")
    parser.add_argument("--checkpoint", type=Path, default=None, help="convert this .pth instead of downloading it")
    parser.add_argument("--cutout-only", action="store_true", help="only InSPyReNet, not the diffusion pipelines")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when the cutout weights are in place")
    parser.add_argument(
        "--offline-ok", action="store_true", help="no network: say how to get test weights in one line, exit 0"
    )
    parser.add_argument(
        "--effects",
        default=",".join(DIFFUSION_EFFECTS),
        help=f"diffusion effects to fetch, comma-separated (default: all, {','.join(DIFFUSION_EFFECTS)})",
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="EFFECT=HUB_ID", help="fetch EFFECT's pipeline from HUB_ID"
    )
    parser.add_argument(
        "--vae", action="append", default=[], metavar="EFFECT=HUB_ID", help="replace EFFECT's VAE with HUB_ID's"
    )
    args = parser.parse_args(argv)
    effects = [name for name in args.effects.split(",") if name]
    for name in effects:
        try:
            diffusion_spec(name)
        except ValueError as exc:
            parser.error(str(exc))
    model_ids = _parse_pairs(parser, args.model, "--model")
    vae_ids = _parse_pairs(parser, args.vae, "--vae")

    def diffusion() -> int:
        return 0 if args.cutout_only else fetch_diffusion(args.models_dir, effects, model_ids, vae_ids)

    if args.if_missing and args.checkpoint is None and cutout_weights_present(args.models_dir):
        return diffusion()
    started = time.perf_counter()

    def announce(length: int | None) -> None:
        size = f"{length / 1e6:.0f} MB" if length else "a few hundred MB"
        log.info("cutout: fetching the cutout weights (%s, once) into %s/", size, args.models_dir)

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
            log.error("cutout: %s", exc)
            return 1
        log.warning(
            "cutout: offline (%s), so no cutout weights in %s/: serving without background removal; "
            "`make test-weights` makes random test weights offline, `make weights` fetches the real ones",
            _reason(exc),
            args.models_dir,
        )
        return 0
    except WeightsFetchError as exc:
        log.error("cutout: %s", exc)
        return 1
    log.info("cutout: InSPyReNet_SwinB (%s) -> %s (%.1f s)", args.mode, path, time.perf_counter() - started)
    return diffusion()


def _parse_pairs(parser: argparse.ArgumentParser, values: list[str], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        effect, sep, model_id = value.partition("=")
        if not sep or not effect or not model_id:
            parser.error(f"{flag} takes EFFECT=HUB_ID, got {value!r}")
        pairs[effect] = model_id
    return pairs


def _reason(exc: BaseException) -> str:
    """Why the download got no answer, short: `[Errno -3] Temporary failure in name resolution`."""
    cause = exc.__cause__ or exc
    reason = getattr(cause, "reason", cause)
    return str(reason) or reason.__class__.__name__


def fetch_diffusion(
    models_dir: Path,
    effects: Sequence[str] = DIFFUSION_EFFECTS,
    model_ids: Mapping[str, str] | None = None,
    vae_ids: Mapping[str, str] | None = None,
) -> int:
    """The diffusion pipelines (`fetch_pipelines`), for the command line: its exit status."""
    written = fetch_pipelines(models_dir, effects, model_ids, vae_ids)
    for effect, directory in written.items():
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        log.info("%s: %s at %s", effect, manifest["model_id"], directory)
    return 0
