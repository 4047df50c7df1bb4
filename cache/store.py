"""Result stores: immutable, content-addressed objects (`results/<key>.<ext>`, `masks/...`).

Stores are synchronous; the service calls them from worker threads. Every read is verified
against the sha256 recorded at write time, and a mismatch reads as a miss, so a corrupt
object is recomputed and written again rather than served.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from PIL import Image

log = logging.getLogger("cutout.cache")

IMMUTABLE_CACHE_CONTROL = "public, max-age=31536000, immutable"
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
_OBJECT_NAME = re.compile(r"^(results|masks)/[0-9a-z-]+\.(png|webp|jpeg)$")


class StoreError(Exception):
    """The store could not do what was asked (I/O, network, permissions)."""


def check_object_name(name: str) -> str:
    """Object names are built by the service; refuse anything that could escape the store."""
    if not _OBJECT_NAME.fullmatch(name):
        raise ValueError(f"not a store object name: {name!r}")
    return name


class ResultStore(Protocol):
    backend: str

    def get(self, name: str) -> bytes | None:
        """The verified bytes of an object, or None when absent or corrupt."""

    def lookup(self, name: str) -> tuple[int, int, int] | None:
        """(width, height, bytes) of a stored result image, or None when absent."""

    def put(self, name: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None) -> None:
        """Store an object unless a valid copy is already there (first writer wins).

        `metadata` (a result's `width` and `height`) lets a store answer `lookup` without
        reading the bytes; a store that reads them cheaply may ignore it.
        """

    def result_url(self, result_key: str, extension: str) -> str: ...

    def close(self) -> None: ...


class LocalStore:
    """A directory on local disk: the embedded default.

    Each object `<name>` has a sidecar `<name>.sha256`. Both are written to a temporary file
    in the same directory and renamed into place, so a reader never sees a partial object;
    the sidecar goes first, so an object without a matching sidecar is never trusted.
    """

    backend = "local"

    def __init__(self, root: Path, public_url: str) -> None:
        self.root = root
        self.public_url = public_url.rstrip("/")
        for folder in ("results", "masks"):
            (root / folder).mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.root / check_object_name(name)

    def get(self, name: str) -> bytes | None:
        path = self._path(name)
        try:
            data = path.read_bytes()
            expected = path.with_name(path.name + ".sha256").read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"reading {name}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != expected:
            log.warning("stored object %s fails its checksum; treating it as a miss", name)
            return None
        return data

    def lookup(self, name: str) -> tuple[int, int, int] | None:
        # Local reads are cheap, so a lookup verifies the bytes too: a corrupt file is a miss.
        data = self.get(name)
        return image_info(data) if data is not None else None

    def put(self, name: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None) -> None:
        del content_type, metadata  # the extension decides the type when served; lookups read the header
        path = self._path(name)
        if self.get(name) is not None:
            return
        try:
            _atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode("ascii"))
            _atomic_write(path, data)
        except OSError as exc:
            raise StoreError(f"writing {name}: {exc}") from exc

    def result_url(self, result_key: str, extension: str) -> str:
        return f"{self.public_url}/v1/results/{result_key}.{extension}"

    def close(self) -> None:
        return None


def image_info(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, bytes) read from an image's header."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (OSError, ValueError):
        return None
    return width, height, len(data)


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
