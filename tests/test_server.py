"""The real server: `python -m service` on loopback, real multipart uploads over a socket."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support import photos
from tests.support.client import send_process
from tests.support.server import running_server


def test_real_server_serves_uploads_over_a_socket(tmp_path: Path) -> None:
    with running_server(tmp_path) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        upload = photos.jpeg(160, 120)
        response = send_process(http, upload, effects="blackwhite,dithering", background="none")
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        fetched = http.get(results["dithering"]["url"])
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        again = send_process(http, upload, effects="blackwhite,dithering", background="none")
        assert {r["cache"] for r in again.json()["results"].values()} == {"hit"}
        bad = http.post(
            "/v1/process",
            files={"image": ("x.png", b"not a png", "image/png")},
            data={"background": "none", "effects": "popart"},
        )
        assert bad.status_code == 415 and bad.json()["code"] == "unsupported_image"
        assert http.get("/health").status_code == 200
