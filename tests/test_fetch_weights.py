"""A newcomer's first `make run`: the cutout weights are fetched when absent, offline says how to go on.

No test here reaches the internet: the checkpoint's address is pointed at a loopback HTTP server
serving a random-weights checkpoint in transparent-background's format (same architecture, so
the real download, md5 check, conversion and serving code all run), or at a closed port.
"""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from effects import DIFFUSION_EFFECTS, diffusion_spec
from effects import weights as fetch_weights
from effects.inspyrenet import MANIFEST_FILE, MODEL_DIR
from effects.weights import CheckpointSource
from tests.support import ROOT, photos
from tests.support.client import send_process
from tests.support.server import free_port, running_server
from tests.support.weights import random_inspyrenet_state


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    directory = tmp_path_factory.mktemp("mirror")
    torch.save(random_inspyrenet_state("fast", 3), directory / "ckpt_fast.pth")
    return directory


@pytest.fixture
def mirror(checkpoint_dir: Path) -> Iterator[str]:
    """The checkpoint over HTTP on loopback; its URL."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(checkpoint_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ckpt_fast.pth"
    finally:
        server.shutdown()
        server.server_close()


def point_at(monkeypatch: pytest.MonkeyPatch, url: str, md5: str | None) -> list[str]:
    """Make the script download from `url`; the list records each time it asked where to."""
    asked: list[str] = []

    def source(mode: str = "base") -> CheckpointSource:
        asked.append(mode)
        return CheckpointSource(mode, url, md5, "ckpt_fast.pth", 384)

    monkeypatch.setattr(fetch_weights, "package_checkpoint_source", source)
    return asked


def no_diffusion(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("`make run` must not fetch the diffusion pipelines")

    monkeypatch.setattr(fetch_weights, "fetch_diffusion", refuse)


RUN_FLAGS = ["--mode", "fast", "--cutout-only", "--if-missing", "--offline-ok"]


def test_make_run_fetches_the_cutout_weights_before_serving() -> None:
    # -n prints the recipe without running it; -o keeps make from (re)installing the venv.
    recipe = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "run"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    fetch = next(i for i, line in enumerate(recipe) if "scripts/fetch_weights.py" in line)
    serve = next(i for i, line in enumerate(recipe) if line.endswith("-m service"))
    assert fetch < serve
    for flag in ("--cutout-only", "--if-missing", "--offline-ok"):
        assert flag in recipe[fetch]
    assert "${CUTOUT_MODELS_DIR:-models}" in recipe[fetch], "the same folder the service reads"


def test_first_run_fetches_converts_and_the_server_removes_backgrounds(
    tmp_path: Path,
    mirror: str,
    checkpoint_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "models"
    md5 = hashlib.md5((checkpoint_dir / "ckpt_fast.pth").read_bytes(), usedforsecurity=False).hexdigest()
    asked = point_at(monkeypatch, mirror, md5)
    no_diffusion(monkeypatch)

    assert fetch_weights.main([str(models), *RUN_FLAGS]) == 0

    err = capsys.readouterr().err
    assert "fetching the cutout weights (" in err and "MB, once)" in err
    assert (models / MODEL_DIR / MANIFEST_FILE).is_file()
    assert not list(models.glob(".download-*")), "no scratch left behind"

    # A second run finds them and does nothing at all (no network, no output).
    assert fetch_weights.main([str(models), *RUN_FLAGS]) == 0
    assert len(asked) == 1
    assert capsys.readouterr() == ("", "")

    # And the server started next (as `make run` does) removes backgrounds.
    upload = photos.png(64, 48, seed=1)
    env = {"CUTOUT_MODELS_DIR": str(models), "CUTOUT_PUBLIC_URL": ""}
    with (
        running_server(tmp_path, env, wait_for="/ready") as server,
        httpx.Client(base_url=server.url, timeout=300) as client,
    ):
        response = send_process(client, upload, effects="cutout", background="transparent")
        assert response.status_code == 200, response.text
        result = response.json()["results"]["cutout"]
        assert client.get(result["url"]).status_code == 200


def test_offline_says_in_one_line_how_to_get_test_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    point_at(monkeypatch, f"http://127.0.0.1:{free_port()}/ckpt_fast.pth", None)  # nothing listens there
    no_diffusion(monkeypatch)

    assert fetch_weights.main([str(tmp_path / "models"), *RUN_FLAGS]) == 0, "make run goes on to serve"

    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("cutout: offline (") and "Connection refused" in line
    assert "`make test-weights`" in line and "serving without background removal" in line
    assert not (tmp_path / "models" / MODEL_DIR / MANIFEST_FILE).exists()


def test_without_offline_ok_an_unreachable_download_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    point_at(monkeypatch, f"http://127.0.0.1:{free_port()}/ckpt_fast.pth", None)
    monkeypatch.setattr(fetch_weights.time, "sleep", lambda seconds: None)
    assert fetch_weights.main([str(tmp_path / "models"), "--mode", "fast", "--cutout-only"]) == 1
    err = capsys.readouterr().err
    assert err.count("failed (attempt") == fetch_weights.DOWNLOAD_ATTEMPTS
    assert "could not download" in err


def test_a_server_answering_an_error_is_not_mistaken_for_offline(
    tmp_path: Path, mirror: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    point_at(monkeypatch, mirror.replace("ckpt_fast.pth", "gone.pth"), None)  # 404
    assert fetch_weights.main([str(tmp_path / "models"), *RUN_FLAGS]) == 1
    assert "HTTP Error 404" in capsys.readouterr().err


def test_diffusion_pipelines_come_from_the_registry_unless_the_command_line_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    (models / MODEL_DIR).mkdir(parents=True)
    (models / MODEL_DIR / MANIFEST_FILE).write_text("{}", encoding="utf-8")  # the cutout is in place
    asked: list[tuple[object, ...]] = []

    def record(*args: object) -> int:
        asked.append(args)
        return 0

    monkeypatch.setattr(fetch_weights, "fetch_diffusion", record)
    assert fetch_weights.main([str(models), "--if-missing"]) == 0
    assert asked.pop() == (models, list(DIFFUSION_EFFECTS), {}, {})
    assert fetch_weights.main([str(models), "--if-missing", "--effects", "comic", "--model", "comic=x/y"]) == 0
    assert asked.pop() == (models, ["comic"], {"comic": "x/y"}, {})
    for bad, message in ((["--effects", "popart"], "not a diffusion effect"), (["--model", "comic"], "EFFECT=HUB_ID")):
        with pytest.raises(SystemExit) as caught:
            fetch_weights.main([str(models), "--if-missing", *bad])
        assert caught.value.code == 2
        assert message in capsys.readouterr().err
    assert not asked


def test_a_pipeline_is_fetched_from_the_hub_id_of_its_registry_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requested: list[str] = []

    class Stop(Exception):
        pass

    def from_pretrained_fp16(pipeline_class: object, model_id: str, **options: object) -> None:
        requested.append(model_id)
        raise Stop

    monkeypatch.setattr(fetch_weights, "_from_pretrained_fp16", from_pretrained_fp16)
    with pytest.raises(Stop):
        fetch_weights.fetch_pipelines(tmp_path, ["comic"])
    with pytest.raises(Stop):
        fetch_weights.fetch_pipelines(tmp_path, ["comic"], model_ids={"comic": "elsewhere/comic"})
    assert requested == [diffusion_spec("comic").hub_id, "elsewhere/comic"]
    assert requested[0] == "nitrosocke/Ghibli-Diffusion"
