"""Per-client rate limits: real HTTP against `python -m service`, forged X-Forwarded-For chains."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.ratelimit import client_address
from tests.support import photos
from tests.support.server import running_server

ORIGIN = "https://shop.example"
LB = "34.120.5.9"  # the load balancer's own address, the last entry it appends


def behind_lb(client: str, forged: str | None = None) -> dict[str, str]:
    """Headers as Cloud Run receives them behind the load balancer: [forged,] client, LB."""
    chain = ", ".join(part for part in (forged, client, LB) if part)
    return {"X-Forwarded-For": chain, "Origin": ORIGIN}


def post_photo(http: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    return http.post(
        "/v1/process",
        data={"effects": "popart", "background": "none"},
        files={"image": ("cat.jpg", photos.jpeg(48, 32), "image/jpeg")},
        headers=headers,
    )


def test_forged_forwarded_for_does_not_escape_the_limit_over_real_http(tmp_path: Path) -> None:
    env = {
        "CUTOUT_RATE_LIMIT_PROCESS": "3/minute",
        "CUTOUT_TRUSTED_PROXY_HOPS": "2",
        "CUTOUT_ALLOWED_ORIGINS": ORIGIN,
    }
    with running_server(tmp_path, env) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        # A new forged first entry on every request: the key stays the client the LB saw.
        for attempt in range(3):
            response = post_photo(http, behind_lb("203.0.113.7", forged=f"10.0.0.{attempt}"))
            assert response.status_code == 200, response.text
        refused = post_photo(http, behind_lb("203.0.113.7", forged="10.9.9.9"))
        assert refused.status_code == 429, refused.text
        body = refused.json()
        assert body["code"] == "rate_limited"
        assert "process" in body["detail"] and "3/minute" in body["detail"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["access-control-allow-origin"] == ORIGIN
        assert "Retry-After" in refused.headers["access-control-expose-headers"]

        # Without any forged entry, and with the client's own header appended to: still limited.
        assert post_photo(http, behind_lb("203.0.113.7")).status_code == 429

        # The limit applies before the body is read: an oversized upload is refused with 429, not 413.
        assert announce_huge_upload(server.url, behind_lb("203.0.113.7")).startswith(b"HTTP/1.1 429 ")

        # Another client behind the same LB has its own budget; reads are a separate family.
        assert post_photo(http, behind_lb("198.51.100.23", forged="203.0.113.7")).status_code == 200
        assert http.get("/health", headers=behind_lb("203.0.113.7")).status_code == 200
        assert http.get("/v1/effects", headers=behind_lb("203.0.113.7")).status_code == 200

        # /warmup without a credential has a budget of its own (the process family's is spent),
        # and answers readiness only.
        warmup = http.post("/warmup", headers=behind_lb("203.0.113.7"))
        assert warmup.status_code == 200 and warmup.json()["warmed"] is False

        metrics = http.get("/metrics").text
        assert 'cutout_rate_limited_total{family="process"} 3.0' in metrics


def announce_huge_upload(base: str, headers: dict[str, str]) -> bytes:
    """Announce a 1 GB body over a raw socket, send 1 KiB of it, return the status line."""
    host, port = base.removeprefix("http://").split(":")
    head = ["POST /v1/process HTTP/1.1", f"Host: {host}", "Content-Length: 1000000000", "Content-Type: image/jpeg"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b"x" * 1024)
        return sock.makefile("rb").readline()


def test_read_routes_have_their_own_limit(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(rate_limit_read="2/minute", rate_limit_process="50/minute")
    assert client.get("/v1/effects").status_code == 200
    assert client.get("/health").status_code == 200
    refused = client.get("/v1/effects", headers={"Origin": ORIGIN})
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    assert int(refused.headers["retry-after"]) >= 1
    # The processing family is untouched by the reads.
    response = client.post(
        "/v1/process",
        data={"effects": "dithering", "background": "none"},
        files={"image": ("cat.jpg", photos.jpeg(48, 32), "image/jpeg")},
    )
    assert response.status_code == 200, response.text


def test_limits_are_per_app(client_factory: Callable[..., TestClient]) -> None:
    first = client_factory(rate_limit_read="1/minute")
    second = client_factory(rate_limit_read="1/minute")
    assert first.get("/health").status_code == 200
    assert second.get("/health").status_code == 200
    assert first.get("/health").status_code == 429


def scope(forwarded: list[str], peer: str = "127.0.0.1") -> dict[str, object]:
    return {
        "type": "http",
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
        "client": (peer, 50000),
    }


@pytest.mark.parametrize(
    ("forwarded", "hops", "expected"),
    [
        # Local: no trusted proxy, the header is ignored whatever it says.
        (["6.6.6.6"], 0, "127.0.0.1"),
        ([], 0, "127.0.0.1"),
        # Behind the load balancer: <supplied>, <client>, <lb>.
        (["203.0.113.7, 34.120.5.9"], 2, "203.0.113.7"),
        (["6.6.6.6, 7.7.7.7, 203.0.113.7, 34.120.5.9"], 2, "203.0.113.7"),
        (["6.6.6.6", "203.0.113.7, 34.120.5.9"], 2, "203.0.113.7"),  # several header lines are one list
        ([" 6.6.6.6 ,203.0.113.7 , 34.120.5.9 "], 2, "203.0.113.7"),
        # One trusted hop (Cloud Run's own front end): the last entry.
        (["6.6.6.6, 203.0.113.7"], 1, "203.0.113.7"),
        # Fewer entries than trusted hops (a direct run.app call): the leftmost, written by our side.
        (["203.0.113.7"], 2, "203.0.113.7"),
        # No header although proxies are expected: the socket peer.
        ([], 2, "127.0.0.1"),
        # IPv6 clients are keyed by their /64; IPv4-mapped addresses as IPv4.
        (["2001:db8:1:2:aaaa::1, 34.120.5.9"], 2, "2001:db8:1:2::/64"),
        (["2001:db8:1:2:bbbb::9, 34.120.5.9"], 2, "2001:db8:1:2::/64"),
        (["::ffff:203.0.113.7, 34.120.5.9"], 2, "203.0.113.7"),
    ],
)
def test_client_address(forwarded: list[str], hops: int, expected: str) -> None:
    assert client_address(scope(forwarded), hops) == expected
