"""The `gcs` result store: a Cloud Storage bucket served to browsers by Cloud CDN.

Objects are written once: every upload carries `ifGenerationMatch=0`, so the first writer
wins and a concurrent writer of the same key gets 412, which means "already stored". Each
object records the sha256 of its bytes (and their md5, which Cloud Storage also computes
itself) in its metadata; a read that does not match is a miss, and the object's generation
is remembered so that the rewrite replaces exactly that corrupt version and nothing newer.

The client's own `STORAGE_EMULATOR_HOST` points it at an emulator (anonymous credentials);
otherwise it uses Application Default Credentials (the Cloud Run service account).

Kept pictures (`kept/<sha256>.<ext>`, see `keep`) carry their keep-until date as the object's
Custom-Time, and the bucket's lifecycle (terraform/storage.tf) deletes an object a day after it:
the date only ever moves later, which Cloud Storage itself enforces for Custom-Time.

Storage failures raise `StoreError`, which the request flow counts and serves around. Calls
are bounded: a short timeout per HTTP call, retries only until a short deadline, and after a
failure the store is skipped for a cool-down, so a dead store costs one slow call, not one
per request.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage
from google.cloud.storage import exceptions as storage_exceptions
from google.cloud.storage.retry import DEFAULT_RETRY

from cache.store import IMMUTABLE_CACHE_CONTROL, StoreError, check_kept, check_object_name, image_info, now_utc

log = logging.getLogger("cutout.cache.gcs")

T = TypeVar("T")

# Everything the client raises when storage cannot answer: HTTP errors, retry deadline hit,
# connection and timeout errors (requests' errors are OSErrors), credentials, bad transfers.
_STORAGE_FAILURES = (
    api_exceptions.GoogleAPIError,
    auth_exceptions.GoogleAuthError,
    storage_exceptions.InvalidResponse,
    storage_exceptions.DataCorruption,
    OSError,
)
_CONNECT_TIMEOUT_S = 3.0
_REMEMBERED_CORRUPT = 1024
_KEEP_ATTEMPTS = 4


class GcsStore:
    backend = "gcs"

    def __init__(
        self,
        bucket: str,
        cdn_url: str,
        *,
        timeout_s: float = 10.0,
        retry_deadline_s: float = 2.0,
        failure_cooldown_s: float = 15.0,
        kept_max_age_days: int = 1095,
        client: storage.Client | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("GcsStore needs a bucket name (CUTOUT_GCS_BUCKET)")
        if not cdn_url:
            raise ValueError("GcsStore needs the CDN base URL serving /cache/* (CUTOUT_CDN_URL)")
        self.bucket_name = bucket
        self.cdn_url = cdn_url.rstrip("/")
        try:
            # The project comes from GOOGLE_CLOUD_PROJECT or the credentials; object calls need none.
            self._client = client or storage.Client()
        except auth_exceptions.DefaultCredentialsError as exc:
            raise StoreError(
                "CUTOUT_CACHE_BACKEND=gcs found no Google credentials; on Cloud Run the service account "
                "provides them, locally run `gcloud auth application-default login` or set "
                "STORAGE_EMULATOR_HOST to use an emulator"
            ) from exc
        self._bucket = self._client.bucket(bucket)
        self._timeout = (min(_CONNECT_TIMEOUT_S, timeout_s), timeout_s)
        self._retry = DEFAULT_RETRY.with_delay(initial=0.1, maximum=1.0, multiplier=2.0).with_timeout(retry_deadline_s)
        self._cooldown_s = failure_cooldown_s
        # The bucket deletes kept objects this old whatever their date (a backstop); a keep that
        # needs longer renews the object (same bytes, new generation), which restarts its age.
        self._kept_max_age = dt.timedelta(days=kept_max_age_days)
        self._skip_until = 0.0
        self._lock = threading.Lock()
        # name -> generation of a version that failed verification: the one a repair may replace.
        self._corrupt: OrderedDict[str, int] = OrderedDict()
        self.failures = 0

    # ------------------------------------------------------------------ ResultStore

    def get(self, name: str) -> bytes | None:
        check_object_name(name)
        blob = self._call("read", name, lambda: self._bucket.get_blob(name, timeout=self._timeout, retry=self._retry))
        if blob is None:
            return None
        generation = int(blob.generation)

        def download() -> bytes | None:
            try:
                # Pinned to the generation whose metadata was just read, so bytes and checksum match.
                data: bytes = blob.download_as_bytes(
                    if_generation_match=generation, timeout=self._timeout, retry=self._retry
                )
            except (api_exceptions.NotFound, api_exceptions.PreconditionFailed):
                return None  # deleted or replaced since the metadata read: a miss
            return data

        data = self._call("read", name, download)
        if data is None:
            return None
        expected = (blob.metadata or {}).get("sha256")
        if expected != hashlib.sha256(data).hexdigest():
            self._mark_corrupt(name, generation, "its bytes do not match the sha256 in its metadata")
            return None
        return data

    def lookup(self, name: str) -> tuple[int, int, int] | None:
        """Width, height and size from the object's metadata: one small request, no download.

        Cloud Storage computes the md5 of what it stores; comparing it with the md5 the writer
        recorded catches an object whose bytes are not what was meant, without reading them.
        """
        check_object_name(name)
        blob = self._call("lookup", name, lambda: self._bucket.get_blob(name, timeout=self._timeout, retry=self._retry))
        if blob is None:
            return None
        metadata = blob.metadata or {}
        recorded_md5 = metadata.get("md5")
        try:
            width, height = int(metadata["width"]), int(metadata["height"])
        except (KeyError, ValueError):
            width = height = 0
        if recorded_md5 is None or blob.md5_hash is None or width <= 0 or height <= 0:
            # Written without the metadata a lookup needs: read and verify the bytes instead.
            data = self.get(name)
            return image_info(data) if data is not None else None
        if recorded_md5 != blob.md5_hash:
            self._mark_corrupt(name, int(blob.generation), "its stored md5 differs from the one its writer recorded")
            return None
        return width, height, int(blob.size)

    def put(self, name: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None) -> None:
        check_object_name(name)
        with self._lock:
            replace_generation = self._corrupt.get(name, 0)
        blob = self._bucket.blob(name)
        blob.cache_control = IMMUTABLE_CACHE_CONTROL
        blob.content_type = content_type
        blob.metadata = {
            **(metadata or {}),
            "sha256": hashlib.sha256(data).hexdigest(),
            "md5": base64.b64encode(hashlib.md5(data).digest()).decode("ascii"),
        }

        def upload() -> None:
            try:
                # 0: only if absent. For a repair: only if the corrupt version is still the live one.
                blob.upload_from_string(
                    data,
                    content_type=content_type,
                    if_generation_match=replace_generation,
                    timeout=self._timeout,
                    retry=self._retry,
                )
            except api_exceptions.PreconditionFailed:
                # Another writer got there first (or a retry of our own write did): already stored.
                log.debug("%s is already stored; keeping the first writer's copy", name)

        self._call("write", name, upload)
        if replace_generation:
            log.info("repaired corrupt stored object %s (replaced generation %d)", name, replace_generation)
        with self._lock:
            self._corrupt.pop(name, None)

    def result_url(self, result_key: str, extension: str) -> str:
        # The load balancer routes /cache/* to the bucket; Cloud CDN caches it at the edge.
        return f"{self.cdn_url}/cache/results/{result_key}.{extension}"

    def keep(self, name: str, data: bytes, content_type: str, until: dt.datetime) -> dt.datetime:
        """Write or lengthen a kept object; the Custom-Time it carries afterwards.

        Absent: uploaded with `ifGenerationMatch=0` and `customTime=until` in one request.
        Present and sound: its Custom-Time is patched to `until` if that is later
        (`ifMetagenerationMatch`, so two keeps racing re-read rather than overwrite).
        Corrupt, or too old for the backstop age rule to spare it until `until`: the same
        bytes are uploaded as a new generation (`ifGenerationMatch=<that generation>`).
        """
        check_kept(name, data)
        until = until.astimezone(dt.UTC)
        sha256 = hashlib.sha256(data).hexdigest()
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")
        spare = self._kept_max_age - dt.timedelta(days=1)
        if until > now_utc() + spare:
            raise StoreError(f"keep {name}: {until:%Y-%m-%d} is past what the bucket's backstop age rule allows")
        for _ in range(_KEEP_ATTEMPTS):
            existing = self._call("keep", name, partial(self._read_blob, name))
            current = _custom_time(existing) if existing is not None else None
            if existing is not None and _sound(existing, md5) and existing.time_created + spare >= until:
                if current is not None and current >= until:
                    return current
                patched = self._call("keep", name, partial(self._patch_custom_time, existing, until))
                if patched is not None:
                    return patched
                continue  # changed since it was read: read it again
            generation = 0 if existing is None else int(existing.generation)
            blob = self._bucket.blob(name)
            blob.cache_control = IMMUTABLE_CACHE_CONTROL
            blob.content_type = content_type
            blob.custom_time = until if current is None else max(until, current)
            blob.metadata = {"sha256": sha256, "md5": md5}
            written = self._call("keep", name, partial(self._upload_kept, blob, data, content_type, generation))
            if written is not None:
                if generation:
                    log.info("renewed kept object %s (replaced generation %d)", name, generation)
                return written
        raise StoreError(f"keep {name}: the object changed under every attempt; try again")

    def _read_blob(self, name: str) -> storage.Blob | None:
        blob: storage.Blob | None = self._bucket.get_blob(name, timeout=self._timeout, retry=self._retry)
        return blob

    def _upload_kept(self, blob: storage.Blob, data: bytes, content_type: str, generation: int) -> dt.datetime | None:
        try:
            blob.upload_from_string(
                data,
                content_type=content_type,
                if_generation_match=generation,
                timeout=self._timeout,
                retry=self._retry,
            )
        except api_exceptions.PreconditionFailed:
            return None
        return _required_custom_time(blob)

    def _patch_custom_time(self, blob: storage.Blob, until: dt.datetime) -> dt.datetime | None:
        blob.custom_time = until
        try:
            blob.patch(if_metageneration_match=int(blob.metageneration), timeout=self._timeout, retry=self._retry)
        except (api_exceptions.PreconditionFailed, api_exceptions.BadRequest):
            # Another keep changed it first (metageneration), or set a later date than ours
            # (Cloud Storage refuses to move a Custom-Time earlier): read it again.
            return None
        return _required_custom_time(blob)

    def kept_url(self, name: str) -> str:
        check_kept(name)
        return f"{self.cdn_url}/cache/{name}"

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ internals

    def _call(self, action: str, name: str, operation: Callable[[], T]) -> T:
        remaining = self._skip_until - time.monotonic()
        if remaining > 0:
            raise StoreError(f"{action} {name}: storage failed recently; skipping it for another {remaining:.1f}s")
        try:
            return operation()
        except _STORAGE_FAILURES as exc:
            self.failures += 1
            self._skip_until = time.monotonic() + self._cooldown_s
            raise StoreError(f"{action} {name} in gs://{self.bucket_name}: {describe(exc)}") from exc

    def _mark_corrupt(self, name: str, generation: int, reason: str) -> None:
        log.warning(
            "stored object gs://%s/%s (generation %d) is corrupt: %s; treating it as a miss",
            self.bucket_name,
            name,
            generation,
            reason,
        )
        with self._lock:
            self._corrupt[name] = generation
            self._corrupt.move_to_end(name)
            while len(self._corrupt) > _REMEMBERED_CORRUPT:
                self._corrupt.popitem(last=False)


def _custom_time(blob: storage.Blob) -> dt.datetime | None:
    value: dt.datetime | None = blob.custom_time
    return value


def _required_custom_time(blob: storage.Blob) -> dt.datetime:
    """The Custom-Time storage answered with (the client refreshes the blob from each answer)."""
    value = _custom_time(blob)
    if value is None:
        raise StoreError(f"gs://{blob.bucket.name}/{blob.name} came back without the Custom-Time it was given")
    return value


def _sound(blob: storage.Blob, md5: str) -> bool:
    """The stored bytes are the ones meant: storage's md5 matches the writer's and ours."""
    return bool((blob.metadata or {}).get("md5") == blob.md5_hash == md5)


def describe(exc: BaseException) -> str:
    """The useful part of a storage error (a RetryError hides the last real one)."""
    cause: Any = getattr(exc, "cause", None) if isinstance(exc, api_exceptions.RetryError) else None
    shown = cause if isinstance(cause, BaseException) else exc
    return f"{shown.__class__.__name__}: {shown}"
