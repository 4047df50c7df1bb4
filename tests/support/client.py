"""Requests as a storefront sends them, over the test client, httpx or a raw socket; the store's integrity."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

BOUNDARY = "cutoutboundary"
# The fields `multipart_body` sends by default: popart on the original background.
POPART = {"effects": "popart", "background": "none"}


def image_file(upload: bytes) -> tuple[str, bytes, str]:
    """The multipart file a browser sends for these bytes: a name and type matching the format."""
    if upload.startswith(b"\x89PNG"):
        return "photo.png", upload, "image/png"
    return "photo.jpg", upload, "image/jpeg"


def send_effect(client: TestClient | httpx.Client, upload: bytes, effect: str, **fields: str) -> Any:
    """POST /v1/effects/{effect} with the photo, on the original background unless told."""
    return client.post(
        f"/v1/effects/{effect}", data={"background": "none", **fields}, files={"image": image_file(upload)}
    )


def send_process(client: TestClient | httpx.Client, upload: bytes, **fields: str) -> Any:
    """POST /v1/process with the photo and `fields` as the form."""
    return client.post("/v1/process", data=fields, files={"image": image_file(upload)})


def multipart_body(upload: bytes, fields: Mapping[str, str] = POPART, boundary: str = BOUNDARY) -> bytes:
    """A /v1/process form with `fields` and the photo, built by hand: for sockets and dribbled bodies."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + upload
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def multipart_head(url: str, body_length: int, boundary: str = BOUNDARY) -> bytes:
    """The request line and headers of a POST /v1/process of `multipart_body`'s form."""
    port = url.rsplit(":", 1)[1]
    return (
        f"POST /v1/process HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {body_length}\r\n\r\n"
    ).encode()


def connect(url: str) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_answer(sock: socket.socket, timeout_s: float = 10.0, data: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 answer with a Content-Length body from a raw socket (`data`: read already)."""
    sock.settimeout(timeout_s)
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def assert_store_clean(cache_dir: Path) -> int:
    """No temporary file left behind, and every object matches the checksum written with it.

    Returns how many results and masks the store holds (photos held for an order to keep,
    `uploads/`, are checked but not counted: a request holds its photo while it computes). A
    checksum sidecar without its object may remain after a failed write (the sidecar is written
    first); it is never trusted on its own.
    """
    leftovers = [path for path in cache_dir.rglob(".tmp-*")]
    assert not leftovers, f"temporary files left in the store: {leftovers}"
    objects = 0
    for path in cache_dir.rglob("*"):
        if not path.is_file() or path.name.endswith(".sha256"):
            continue
        sidecar = path.with_name(path.name + ".sha256")
        assert sidecar.is_file(), f"object without checksum: {path}"
        expected = sidecar.read_text(encoding="ascii").strip()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected, f"partial or corrupt object: {path}"
        objects += path.parent.name != "uploads"
    return objects
