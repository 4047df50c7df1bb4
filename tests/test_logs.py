"""Logs: the real `python -m service` writes JSON lines Cloud Logging parses, one access line per request."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import httpx
from opentelemetry import trace

from service.logs import CloudLoggingFormatter, TextFormatter
from service.telemetry import install_tracing
from tests.support import photos
from tests.support.server import running_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_IP = "203.0.113.77"


def read_lines(log_path: Path) -> list[dict[str, Any]]:
    lines = log_path.read_text().splitlines()
    assert lines, "the server wrote no log"
    return [json.loads(line) for line in lines if line.strip()]  # every line is one JSON object


def test_json_lines_from_the_real_server(tmp_path: Path) -> None:
    env = {"CUTOUT_GCP_PROJECT": "cutout-prod", "CUTOUT_LOG_FORMAT": "json", "CUTOUT_TRUSTED_PROXY_HOPS": "2"}
    upload = photos.jpeg(64, 48)
    with running_server(tmp_path, env) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post(
            "/v1/process",
            data={"effects": "popart,dithering", "background": "none"},
            files={"image": ("my-cat.jpg", upload, "image/jpeg")},
            headers={
                "X-Cloud-Trace-Context": f"{TRACE_ID}/1;o=1",
                "X-Forwarded-For": f"{CLIENT_IP}, 34.120.5.9",
            },
        )
        assert response.status_code == 200, response.text
        bad = http.post(
            "/v1/process",
            data={"background": "none", "effects": "popart"},
            files={"image": ("x.png", b"nope", "image/png")},
        )
        assert bad.status_code == 415
    entries = read_lines(server.log_path)

    for entry in entries:
        assert entry["severity"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}, entry
        assert isinstance(entry["message"], str) and entry["message"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])

    access = [entry for entry in entries if entry["logger"] == "cutout.access"]
    processed = [entry for entry in access if entry["path"] == "/v1/process"]
    assert len(processed) == 2  # one line per request

    line = next(entry for entry in processed if entry["status"] == 200)
    assert line["logging.googleapis.com/trace"] == f"projects/cutout-prod/traces/{TRACE_ID}"
    assert re.fullmatch(r"[0-9a-f]{16}", line["logging.googleapis.com/spanId"])
    assert line["logging.googleapis.com/trace_sampled"] is True
    assert line["method"] == "POST" and line["severity"] == "INFO"
    assert line["latency_ms"] > 0
    assert line["effects"] == ["popart", "dithering"]
    assert line["cache"] == {"popart": "miss", "dithering": "miss"}
    assert line["cold_start"] is True  # the first request this process served (health polls aside)
    assert {"guard", "hash", "cache lookup", "decode", "effect", "encode", "store"} <= set(line["stages_ms"])
    assert line["gpu_seconds"] > 0
    assert line["upload_bytes"] >= len(upload)
    assert line["message"].startswith("POST /v1/process 200 ")

    refused = next(entry for entry in processed if entry["status"] == 415)
    assert refused["cold_start"] is False and "cache" not in refused
    assert any(entry["path"] == "/health" for entry in access)

    # No personal data and no image bytes anywhere: no client address, no file name, short lines.
    text = server.log_path.read_text()
    assert CLIENT_IP not in text and "my-cat" not in text
    assert all(len(json.dumps(entry)) < 4000 for entry in access)


def test_formatter_fields_and_exceptions() -> None:
    install_tracing()
    formatter = CloudLoggingFormatter("proj")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        try:
            raise ValueError("boom")
        except ValueError:
            record = logging.LogRecord(
                "cutout.test", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info()
            )
        record.effect = "popart"  # what `extra=` does
        entry = json.loads(formatter.format(record))
        trace_id = f"{span.get_span_context().trace_id:032x}"
    assert entry["severity"] == "ERROR"
    assert entry["message"].startswith("failed here\nTraceback") and "ValueError: boom" in entry["message"]
    assert entry["logging.googleapis.com/trace"] == f"projects/proj/traces/{trace_id}"
    assert entry["effect"] == "popart"

    outside = json.loads(formatter.format(logging.LogRecord("x", logging.WARNING, __file__, 1, "plain", (), None)))
    assert outside["severity"] == "WARNING" and "logging.googleapis.com/trace" not in outside

    text = TextFormatter().format(logging.LogRecord("cutout.x", logging.INFO, __file__, 1, "hello", (), None))
    assert text.endswith("INFO cutout.x: hello")
