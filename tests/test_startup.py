"""Start-up as the container does it, and the staged start behind it.

Fresh `python -m service` processes (the image's command) with every model configured from test
weights, probed on /ready with the startup probe's period and threshold from terraform/; exit
statuses of processes that cannot serve; and, in process, what each stage answers while the next
one is loading, how failures are told apart (transient: retried; absent or corrupt: not), and a
shutdown that does not wait for a load in flight.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import effects.engine as engine_module
from effects import DIFFUSION_EFFECTS
from service.app import create_app
from tests.support import ROOT
from tests.support.app import make_settings
from tests.support.photos import png as png_bytes
from tests.support.server import running_server

# How many fresh processes the start-up test runs (CI: 10; set CUTOUT_STARTUP_RUNS to change it).
STARTUP_RUNS = int(os.environ.get("CUTOUT_STARTUP_RUNS", "10"))
TOKEN = "s3cret-warmup-token-0123456789"


def startup_probe() -> dict[str, float]:
    """The startup probe as terraform/ deploys it (the variable's defaults)."""
    import hcl2

    options = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
    with (ROOT / "terraform" / "variables.tf").open(encoding="utf-8") as handle:
        parsed: dict[str, Any] = hcl2.load(handle, serialization_options=options)
    for variable in parsed["variable"]:
        if "startup_probe" in variable:
            return {key: float(value) for key, value in variable["startup_probe"]["default"].items()}
    raise AssertionError("terraform/variables.tf has no startup_probe variable")


# Every model configured, JSON logs: as the container runs in production.
SERVICE_ENV = {"CUTOUT_DIFFUSION_EFFECTS": ",".join(DIFFUSION_EFFECTS), "CUTOUT_LOG_FORMAT": "json"}


def probe_until_ready(base: str, process: subprocess.Popen[bytes], probe: dict[str, float]) -> tuple[float, int]:
    """GET /ready as Cloud Run's startup probe does: after the initial delay, every period, each with the
    probe's timeout, at most `failure_threshold` failures. Returns (seconds to 200, probes sent)."""
    started = time.monotonic()
    time.sleep(probe["initial_delay_seconds"])
    for attempt in range(1, int(probe["failure_threshold"]) + 1):
        sent = time.monotonic()
        assert process.poll() is None, f"the server exited with {process.returncode} while starting"
        try:
            if httpx.get(f"{base}/ready", timeout=probe["timeout_seconds"]).status_code == 200:
                return time.monotonic() - started, attempt
        except httpx.HTTPError:
            pass
        time.sleep(max(0.0, probe["period_seconds"] - (time.monotonic() - sent)))
    raise AssertionError(f"/ready did not answer 200 within the startup probe's budget ({probe})")


def wait_all_settled(base: str, timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = httpx.get(f"{base}/ready", timeout=10).json()
        if all(model["status"] != "loading" for model in body["models"].values()):
            return body
        assert time.monotonic() < deadline, f"models still loading after {timeout_s} s: {body['effects']}"
        time.sleep(0.5)


# Each start takes 20-70 s on two busy cores (imports, the cutout, four tiny pipelines, the smoke test).
@pytest.mark.timeout(120 + 180 * STARTUP_RUNS)
def test_fresh_processes_start_ready_every_time(models_dir: Path, tmp_path: Path) -> None:
    """The issue this guards against: loaders racing on diffusers' lazy imports left pipelines failed
    in every fresh process, and /ready at 503 for good. Only a fresh process shows it."""
    probe = startup_probe()
    figures: list[str] = []
    for run in range(STARTUP_RUNS):
        started = time.monotonic()
        with running_server(tmp_path, {**SERVICE_ENV, "CUTOUT_MODELS_DIR": str(models_dir)}, wait_for=None) as server:
            base = server.url
            to_ready, probes = probe_until_ready(base, server.process, probe)

            # The startup probe passed on the cutout model alone; nothing of diffusers was imported before.
            early = httpx.get(f"{base}/ready", timeout=10).json()
            assert early["models"]["cutout"]["status"] == "ready"
            assert early["startup"]["diffusion_imported_before_cutout"] is False
            assert all(early["effects"][name] == "ready" for name in ("blackwhite", "dithering", "popart", "retro8bit"))

            # Every diffusion pipeline loads, its weight read overlapping the others'.
            body = wait_all_settled(base)
            assert {name: model["status"] for name, model in body["models"].items()} == dict.fromkeys(
                ["cutout", *DIFFUSION_EFFECTS], "ready"
            ), body["models"]
            windows = [body["models"][name]["load_window_s"] for name in DIFFUSION_EFFECTS]
            assert max(start for start, _ in windows) < min(end for _, end in windows), windows
            assert all(body["models"][name]["attempts"] == 1 for name in body["models"])

            # The deploy script's smoke test, as the release workflow runs it against a new revision.
            smoke = subprocess.run(
                [sys.executable, "scripts/deploy.py", "smoke", "--url", base, "--ready-deadline", "30"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert smoke.returncode == 0, smoke.stderr

            exit_code, _ = server.stop()
        assert exit_code == 0, server.log_tail()
        log = server.log_path.read_text(encoding="utf-8")
        bad = [line for line in log.splitlines() if '"ERROR"' in line or '"CRITICAL"' in line or "Traceback" in line]
        assert not bad, "\n".join(bad[:5])
        figures.append(
            f"start {run}: /ready 200 after {to_ready:.1f} s ({probes} probe(s)), cutout ready "
            f"{early['startup']['cutout_ready_s']:.1f} s, all models {body['startup']['all_models_settled_s']:.1f} s, "
            f"whole run {time.monotonic() - started:.1f} s"
        )
    print("\n" + "\n".join(figures))


def test_cuda_without_a_gpu_exits_3(models_dir: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here: CUTOUT_DEVICE=cuda is a valid setting")
    env = {**SERVICE_ENV, "CUTOUT_MODELS_DIR": str(models_dir), "CUTOUT_DEVICE": "cuda"}
    with running_server(tmp_path, env, wait_for=None) as server:
        assert server.process.wait(timeout=120) == 3
    assert "CUTOUT_DEVICE=cuda but no CUDA device is visible" in server.log_path.read_text(encoding="utf-8")


def test_a_bad_setting_exits_1_saying_which(models_dir: Path, tmp_path: Path) -> None:
    env = {**SERVICE_ENV, "CUTOUT_MODELS_DIR": str(models_dir), "CUTOUT_MAX_QUEUE": "0"}
    with running_server(tmp_path, env, wait_for=None) as server:
        assert server.process.wait(timeout=120) == 1
    log = server.log_path.read_text(encoding="utf-8")
    assert "invalid setting" in log and "max_queue" in log
    assert "Traceback" not in log


# ------------------------------------------------------------------------ the stages, in process


@pytest.fixture
def pipelines_copy(models_dir: Path, tmp_path: Path) -> Path:
    """The session's models with the (small) diffusion pipelines copied, so a test may break one."""
    directory = tmp_path / "models"
    directory.mkdir()
    (directory / "inspyrenet-swinb").symlink_to(models_dir / "inspyrenet-swinb")
    for name in DIFFUSION_EFFECTS:
        shutil.copytree(models_dir / name, directory / name)
    return directory


def pipeline_class(name: str) -> Any:
    import diffusers

    from effects import diffusion_spec

    return getattr(diffusers, diffusion_spec(name).pipeline_class_name)


def wait_until(predicate: Any, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_diffusion_effect_still_loading_answers_503_model_loading(
    pipelines_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cutout and classic effects serve while a pipeline loads; the loading effect says so."""
    from effects import diffusion

    release = threading.Event()
    real_load = diffusion.load_pipeline

    def held_load(name: str, *args: Any) -> Any:
        if name == "upscale":
            assert release.wait(timeout=120)
        return real_load(name, *args)

    monkeypatch.setattr(diffusion, "load_pipeline", held_load)
    settings = make_settings(tmp_path, models_dir=pipelines_copy, diffusion_effects=["upscale"])
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        try:
            wait_until(lambda: engine.ready)
            ready = client.get("/ready")
            assert ready.status_code == 200
            assert ready.json()["effects"]["upscale"] == "loading"
            listed = {effect["name"]: effect for effect in client.get("/v1/effects").json()["effects"]}
            assert listed["upscale"]["state"] == "loading" and listed["upscale"]["available"] is False
            assert listed["cutout"]["state"] == "ready" and listed["popart"]["available"] is True

            photo = {"image": ("pet.png", png_bytes(96, 64), "image/png")}
            loading = client.post("/v1/effects/upscale", files=photo, data={"background": "none"})
            assert loading.status_code == 503 and loading.json()["code"] == "model_loading", loading.text
            assert int(loading.headers["retry-after"]) > 0
            # The storefront's work does not wait for it.
            assert client.post("/v1/process", files=photo, data={"effects": "cutout,popart"}).status_code == 200
        finally:
            release.set()
        wait_until(lambda: client.app.state.loading.done())  # type: ignore[attr-defined]
        assert engine.states["upscale"].status == "ready"
        listed = {effect["name"]: effect for effect in client.get("/v1/effects").json()["effects"]}
        assert listed["upscale"]["state"] == "ready" and listed["upscale"]["available"] is True


def test_transient_failures_are_retried_and_warmup_tries_again(
    pipelines_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "RETRY_DELAYS_S", (0.05, 0.05))
    comic, aged = pipeline_class("comic"), pipeline_class("aged")
    assert comic is aged  # both StableDiffusionImg2ImgPipeline: told apart by directory
    real = comic.from_pretrained.__func__
    failures = {"comic": 2, "aged": 10**6}  # comic recovers on its third attempt; aged never does
    calls: dict[str, int] = {"comic": 0, "aged": 0}

    def flaky(cls: Any, directory: str, *args: Any, **kwargs: Any) -> Any:
        name = Path(directory).name
        if name in failures:
            calls[name] += 1
            if calls[name] <= failures[name]:
                raise OSError(errno.EIO, "Input/output error", directory)
        return real(cls, directory, *args, **kwargs)

    monkeypatch.setattr(comic, "from_pretrained", classmethod(flaky))
    settings = make_settings(
        tmp_path, models_dir=pipelines_copy, diffusion_effects=["comic", "aged"], warmup_token=TOKEN
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        wait_until(lambda: client.app.state.loading.done())  # type: ignore[attr-defined]
        assert engine.states["comic"].status == "ready" and engine.states["comic"].attempts == 3
        aged_state = engine.states["aged"]
        assert aged_state.status == "failed" and aged_state.attempts == 3 and "Input/output error" in aged_state.detail
        assert client.get("/ready").status_code == 200  # the cutout serves regardless
        photo = {"image": ("pet.png", png_bytes(64, 64), "image/png")}
        refused = client.post("/v1/effects/aged", files=photo, data={"background": "none"})
        assert refused.status_code == 503 and refused.json()["code"] == "model_unavailable"

        # The read error has passed; the Scheduler's warm-up loads the model again.
        failures["aged"] = 0
        answer = client.post("/warmup", headers={"X-Warmup-Token": TOKEN}).json()
        assert answer["models"]["aged"]["status"] == "loading"
        wait_until(lambda: aged_state.status != "loading")
        assert aged_state.status == "ready"


def test_absent_or_corrupt_weights_stay_unavailable_without_retries(pipelines_copy: Path, tmp_path: Path) -> None:
    unet = next((pipelines_copy / "comic" / "unet").glob("*.safetensors"))
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])  # truncated
    shutil.rmtree(pipelines_copy / "aged")  # absent
    settings = make_settings(
        tmp_path, models_dir=pipelines_copy, diffusion_effects=["comic", "aged", "upscale"], warmup_token=TOKEN
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        wait_until(lambda: client.app.state.loading.done())  # type: ignore[attr-defined]
        body = client.get("/ready")
        assert body.status_code == 200
        effects = body.json()["effects"]
        assert effects["comic"] == "missing" and effects["aged"] == "missing" and effects["upscale"] == "ready"
        assert engine.states["comic"].attempts == 1  # a corrupt file is not read again
        client.post("/warmup", headers={"X-Warmup-Token": TOKEN})
        assert engine.states["comic"].status == "missing" and engine.states["comic"].attempts == 1


def test_shutdown_does_not_wait_for_a_load_in_flight(
    pipelines_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 12 GB pipeline may still be reading when SIGTERM comes: the lifespan ends without it."""
    from effects import diffusion

    release = threading.Event()
    entered = threading.Event()

    def stuck_load(*args: Any) -> Any:
        entered.set()
        release.wait(timeout=120)
        raise OSError(errno.EIO, "stopped")

    monkeypatch.setattr(diffusion, "load_pipeline", stuck_load)
    settings = make_settings(tmp_path, models_dir=pipelines_copy, diffusion_effects=["upscale"])
    client = TestClient(create_app(settings))
    client.__enter__()
    try:
        assert entered.wait(timeout=120)
        client.__exit__(None, None, None)  # the lifespan's shutdown: returns while the load is stuck
        assert not release.is_set()
    finally:
        release.set()
