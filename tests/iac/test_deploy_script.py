"""scripts/deploy.py: the gcloud calls it makes, and its smoke and check steps against a real socket.

gcloud is replaced by a recorder that answers like `gcloud run services describe --format=json`;
HTTP goes to a local server standing in for the revision, the CDN and Cloud Monitoring.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def load_deploy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cutout_deploy_script", ROOT / "scripts" / "deploy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


deploy = load_deploy()
TARGET = deploy.Target("proj", "us-central1", "cutout")


def described(traffic: list[dict[str, Any]], latest: str = "cutout-00002-new") -> str:
    return json.dumps({"status": {"traffic": traffic, "latestReadyRevisionName": latest}})


class FakeGcloud:
    """Records every gcloud call; answers describe calls from a queue, anything else from a table."""

    def __init__(self, describes: Sequence[str], answers: dict[str, str] | None = None) -> None:
        self.describes = list(describes)
        self.answers = answers or {}
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str]) -> str:
        self.calls.append(list(args))
        if args[:3] == ["run", "services", "describe"]:
            return self.describes.pop(0)
        for prefix, answer in self.answers.items():
            if " ".join(args).startswith(prefix):
                return answer
        return ""


# ---------------------------------------------------------------- pure helpers


def test_canary_url_is_the_load_balancers_canary_route() -> None:
    assert deploy.canary_url("https://cutout.example.com/") == "https://cutout.example.com/canary"
    assert deploy.CANARY_PATH == "/canary/"
    with pytest.raises(deploy.DeployError, match="PUBLIC_URL"):
        deploy.canary_url("")
    with pytest.raises(deploy.DeployError):
        deploy.canary_url("http://cutout.example.com")


def test_serving_revision_is_the_largest_share_and_resolves_latest() -> None:
    service = json.loads(
        described(
            [
                {"latestRevision": True, "percent": 90},
                {"revisionName": "cutout-00001-old", "percent": 10},
                {"revisionName": "cutout-00003-canary", "percent": 0, "tag": "v2-0-0"},
            ]
        )
    )
    assert deploy.serving_revision(service) == "cutout-00002-new"
    assert deploy.serving_revision(service, excluding="cutout-00002-new") == "cutout-00001-old"


def test_tagged_revision_and_the_tags_to_remove() -> None:
    service = json.loads(
        described(
            [
                {"revisionName": "cutout-3", "percent": 100, "tag": "canary"},
                {"revisionName": "cutout-2", "percent": 0, "tag": "v1-0-0"},
                {"revisionName": "cutout-1", "percent": 0, "tag": "v0-9-0"},
                {"revisionName": "cutout-2", "percent": 0, "tag": "v1-0-0"},
            ]
        )
    )
    assert deploy.tagged_revision(service, "canary") == "cutout-3"
    assert deploy.tags_except(service, "canary") == ["v1-0-0", "v0-9-0"]
    with pytest.raises(deploy.DeployError):
        deploy.tagged_revision(service, "v9-9-9")


@pytest.mark.parametrize(
    ("image", "base"),
    [
        ("us-docker.pkg.dev/p/r/cutout:v1.0.0", "us-docker.pkg.dev/p/r/cutout"),
        ("us-docker.pkg.dev/p/r/cutout@sha256:abc", "us-docker.pkg.dev/p/r/cutout"),
        ("localhost:5000/cutout", "localhost:5000/cutout"),
        ("localhost:5000/cutout:v1", "localhost:5000/cutout"),
    ],
)
def test_image_without_reference(image: str, base: str) -> None:
    assert deploy.image_without_reference(image) == base


def test_smoke_image_is_a_valid_png_with_a_subject() -> None:
    image = Image.open(io.BytesIO(deploy.png_bytes(64, 48)))
    image.load()
    assert image.size == (64, 48) and image.mode == "RGB"
    assert image.getpixel((32, 24)) == (230, 140, 60)
    assert image.getpixel((0, 0)) != (230, 140, 60)


def test_multipart_body_parses_back() -> None:
    body, content_type = deploy.multipart({"effects": "cutout"}, {"image": ("a.png", "image/png", b"\x89PNG..")})
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    assert parts["effects"].get_content() == "cutout"
    assert parts["image"].get_filename() == "a.png"
    assert parts["image"].get_content() == b"\x89PNG.."


def test_error_counts_sums_5xx_against_all() -> None:
    answer = {
        "timeSeries": [
            {"metric": {"labels": {"response_code_class": "2xx"}}, "points": [{"value": {"int64Value": "95"}}]},
            {"metric": {"labels": {"response_code_class": "5xx"}}, "points": [{"value": {"int64Value": "3"}}]},
            {"metric": {"labels": {"response_code_class": "4xx"}}, "points": [{"value": {"int64Value": "2"}}]},
        ]
    }
    assert deploy.error_counts(answer) == (3, 100)
    assert deploy.error_counts({}) == (0, 0)


# ---------------------------------------------------------------- gcloud commands


def test_deploy_pins_the_digest_moves_the_canary_tag_to_a_no_traffic_revision_and_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "github_output"
    monkeypatch.setenv("GITHUB_OUTPUT", str(output))
    image = "us-central1-docker.pkg.dev/proj/cutout/cutout:v1.2.0"
    gcloud = FakeGcloud(
        [
            # After the previous release the serving revision carries the canary tag.
            described([{"revisionName": "cutout-00001-old", "percent": 100, "tag": "canary"}]),
            described(
                [
                    {"revisionName": "cutout-00001-old", "percent": 100},
                    {"revisionName": "cutout-00002-new", "percent": 0, "tag": "canary"},
                ]
            ),
        ],
        {"artifacts docker images describe": "sha256:" + "a" * 64 + "\n"},
    )
    argv = ["--project", "proj", "--region", "us-central1", "--public-url", "https://cutout.example.com"]
    assert deploy.main([*argv, "deploy", "--image", image], gcloud) == 0

    free = gcloud.calls.index(
        ["run", "services", "update-traffic", "cutout", *TARGET.flags(), "--remove-tags", "canary"]
    )
    run_deploy = next(call for call in gcloud.calls if call[:2] == ["run", "deploy"])
    assert free < gcloud.calls.index(run_deploy)
    assert "--no-traffic" in run_deploy
    assert run_deploy[run_deploy.index("--tag") + 1] == "canary"
    assert (
        run_deploy[run_deploy.index("--image") + 1]
        == "us-central1-docker.pkg.dev/proj/cutout/cutout@sha256:" + "a" * 64
    )
    assert run_deploy[run_deploy.index("--project") + 1] == "proj"
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    assert outputs["tag"] == "canary"
    assert outputs["revision"] == "cutout-00002-new"
    assert outputs["canary_url"] == "https://cutout.example.com/canary"
    assert outputs["previous_revision"] == "cutout-00001-old"


def test_a_deploy_that_fails_half_way_has_already_reported_where_to_roll_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "github_output"
    monkeypatch.setenv("GITHUB_OUTPUT", str(output))

    class RevisionNeverReady(FakeGcloud):
        def __call__(self, args: Sequence[str]) -> str:
            if list(args[:2]) == ["run", "deploy"]:
                raise deploy.DeployError("Revision 'cutout-00002-new' is not ready and cannot serve traffic")
            return super().__call__(args)

    gcloud = RevisionNeverReady(
        [described([{"revisionName": "cutout-00001-old", "percent": 100, "tag": "canary"}])],
        {"artifacts docker images describe": "sha256:" + "b" * 64},
    )
    argv = ["--project", "proj", "--region", "us-central1", "--public-url", "https://cutout.example.com"]
    assert deploy.main([*argv, "deploy", "--image", "r/cutout:v2"], gcloud) == 1
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    # deploy.yml's rollback step runs when previous_revision is set: it puts the canary tag back.
    assert outputs == {"previous_revision": "cutout-00001-old", "canary_url": "https://cutout.example.com/canary"}


def test_deploy_refuses_an_image_it_cannot_resolve() -> None:
    gcloud = FakeGcloud([described([{"revisionName": "old", "percent": 100}])], {"artifacts": "\n"})
    with pytest.raises(deploy.DeployError, match="digest"):
        deploy.deploy(gcloud, TARGET, "r/cutout:v1", "https://cutout.example.com")
    assert not any(call[:2] == ["run", "deploy"] for call in gcloud.calls)


def test_deploy_needs_the_public_url_before_touching_anything() -> None:
    gcloud = FakeGcloud([])
    assert (
        deploy.main(["--project", "p", "--region", "r", "--public-url", "", "deploy", "--image", "i:v1"], gcloud) == 1
    )
    assert gcloud.calls == []


def test_promote_moves_traffic_to_the_canary_tag() -> None:
    gcloud = FakeGcloud([])
    deploy.promote(gcloud, TARGET, 10)
    assert gcloud.calls[0][:4] == ["run", "services", "update-traffic", "cutout"]
    assert gcloud.calls[0][-2:] == ["--to-tags", "canary=10"]
    with pytest.raises(deploy.DeployError):
        deploy.promote(gcloud, TARGET, 0)


def test_untag_removes_every_tag_but_the_canary() -> None:
    gcloud = FakeGcloud(
        [
            described(
                [
                    {"revisionName": "cutout-3", "percent": 100, "tag": "canary"},
                    {"revisionName": "cutout-2", "percent": 0, "tag": "v1-0-0"},
                    {"revisionName": "cutout-1", "percent": 0, "tag": "v0-9-0"},
                ]
            ),
            described([{"revisionName": "cutout-3", "percent": 100, "tag": "canary"}]),
        ]
    )
    assert deploy.untag(gcloud, TARGET) == ["v1-0-0", "v0-9-0"]
    assert gcloud.calls[-1][-2:] == ["--remove-tags", "v1-0-0,v0-9-0"]
    calls = len(gcloud.calls)
    assert deploy.untag(gcloud, TARGET) == []
    assert len(gcloud.calls) == calls + 1  # only the describe: nothing to remove


def test_rollback_moves_traffic_first_then_the_canary_tag_then_drops_stale_tags() -> None:
    gcloud = FakeGcloud(
        [
            described(
                [
                    {"revisionName": "cutout-00001-old", "percent": 100, "tag": "canary"},
                    {"revisionName": "cutout-00002-bad", "percent": 0, "tag": "v1-2-0"},
                ]
            )
        ]
    )
    deploy.rollback(gcloud, TARGET, "cutout-00001-old")
    changes = [call[-2:] for call in gcloud.calls if call[:3] == ["run", "services", "update-traffic"]]
    assert changes == [
        ["--to-revisions", "cutout-00001-old=100"],
        ["--update-tags", "canary=cutout-00001-old"],
        ["--remove-tags", "v1-2-0"],
    ]


def test_commands_other_than_smoke_need_a_project_and_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GCP_PROJECT_ID", raising=False)
    monkeypatch.delenv("GCP_REGION", raising=False)
    assert deploy.main(["promote", "--percent", "10"], FakeGcloud([])) == 2


# ---------------------------------------------------------------- over a real socket


class Stand:
    """A local stand-in for the tagged revision, the CDN and Cloud Monitoring."""

    def __init__(self) -> None:
        self.not_ready_left = 1
        self.process_status = 200
        self.result_body = deploy.PNG_SIGNATURE + b"rest"
        self.series: dict[str, Any] = {"timeSeries": []}
        self.requests: list[tuple[str, str, bytes, dict[str, str]]] = []
        self.base = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        stand = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                stand.requests.append(("GET", self.path, b"", dict(self.headers.items())))
                path = urlsplit(self.path).path
                if path == "/ready":
                    if stand.not_ready_left > 0:
                        stand.not_ready_left -= 1
                        self.answer(503, b'{"detail": "loading"}')
                    else:
                        self.answer(200, b'{"ready": true}')
                elif path.startswith("/cache/results/"):
                    self.answer(200, stand.result_body, "image/png")
                elif path == "/projects/proj/timeSeries":
                    self.answer(200, json.dumps(stand.series).encode())
                else:
                    self.answer(404, b"{}")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stand.requests.append(("POST", self.path, body, dict(self.headers.items())))
                result = {"results": {"cutout": {"url": f"{stand.base}/cache/results/abc.png", "cache": "miss"}}}
                self.answer(stand.process_status, json.dumps(result).encode())

        return Handler


@pytest.fixture
def stand() -> Iterator[Stand]:
    stand = Stand()
    server = ThreadingHTTPServer(("127.0.0.1", 0), stand.handler())
    stand.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield stand
    server.shutdown()
    server.server_close()


def no_sleep(_: float) -> None:
    pass


def test_smoke_waits_for_ready_processes_a_real_upload_and_reads_the_result(stand: Stand) -> None:
    result = deploy.smoke(stand.base + "/", ready_deadline_s=30, sleep=no_sleep)
    assert result["url"] == f"{stand.base}/cache/results/abc.png"
    methods = [(method, path.split("?")[0]) for method, path, _, _ in stand.requests]
    assert methods == [("GET", "/ready"), ("GET", "/ready"), ("POST", "/v1/process"), ("GET", "/cache/results/abc.png")]
    _, _, body, headers = stand.requests[2]
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body)
    parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    assert parts["effects"].get_content() == "cutout"
    assert parts["image"].get_content().startswith(deploy.PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda stand: setattr(stand, "process_status", 500), "answered 500"),
        (lambda stand: setattr(stand, "result_body", b"<html>"), "not a PNG"),
        (lambda stand: setattr(stand, "not_ready_left", 10**6), "did not answer 200"),
    ],
)
def test_smoke_fails_loudly(stand: Stand, change: Callable[[Stand], None], message: str) -> None:
    change(stand)
    with pytest.raises(deploy.DeployError, match=message):
        deploy.smoke(stand.base, ready_deadline_s=0.5, sleep=no_sleep)


@pytest.mark.parametrize(("errors", "passes"), [(1, True), (5, False)])
def test_check_judges_the_revisions_5xx_ratio_from_cloud_monitoring(
    stand: Stand, monkeypatch: pytest.MonkeyPatch, errors: int, passes: bool
) -> None:
    monkeypatch.setattr(deploy, "MONITORING_API", stand.base)
    stand.not_ready_left = 0
    stand.series = {
        "timeSeries": [
            {
                "metric": {"labels": {"response_code_class": "2xx"}},
                "points": [{"value": {"int64Value": str(100 - errors)}}],
            },
            {"metric": {"labels": {"response_code_class": "5xx"}}, "points": [{"value": {"int64Value": str(errors)}}]},
        ]
    }
    gcloud = FakeGcloud([], {"auth print-access-token": "token-123\n"})

    def run() -> tuple[int, int]:
        counts: tuple[int, int] = deploy.check(
            gcloud, TARGET, "cutout-00002-new", 0.2, 0.02, stand.base, sleep=no_sleep
        )
        return counts

    if passes:
        assert run() == (errors, 100)
    else:
        with pytest.raises(deploy.DeployError, match="5xx"):
            run()
    _, path, _, headers = stand.requests[-1]
    assert headers["Authorization"] == "Bearer token-123"
    query = parse_qs(urlsplit(path).query)
    assert 'resource.labels.revision_name = "cutout-00002-new"' in query["filter"][0]
    assert query["aggregation.groupByFields"] == ["metric.label.response_code_class"]
