"""Keeping an order's pictures: `POST /v1/keep`, `GET /v1/kept/{name}`, and the storefront's `POST /store-image`.

Results are a cache: the bucket deletes them `result_retention_days` after they were written,
and nothing re-renders a result once its photo is gone. An order keeps its pictures by copying
them to `kept/<sha256 of the bytes>.<ext>`, each with a keep-until date:

- the name is the sha256 of the bytes, so a name always means the same picture and no upload,
  by anyone, can replace another's;
- the date only ever moves later (a second keep of the same picture lengthens it, never
  shortens it), which on Cloud Storage is the object's Custom-Time, and the bucket's own
  lifecycle rule deletes the object a day after it (terraform/storage.tf);
- the link answered (`url`) is stable: lengthening the keep does not move the picture.

Tiers keep the old storefront API's meaning: `temporary` (7 days, the default, what a cart
holds), `order_pending` (30), `order_completed` (180), `archived` (730).

The original photo is the one the service processed: send it again in `image`, or name it by
`image_sha256` when this service processed it recently (it keeps a processed upload for
`upload_retention_days`, terraform's, 7 by default; after that the answer is 404
`image_not_cached` and the photo must be sent).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from cache.keys import KEPT_EXTENSIONS, kept_object, result_object, upload_object
from cache.store import CONTENT_TYPES, KEPT_NAME, ResultStore, StoreError, now_utc
from service.deps import SettingsDep, StoreDep
from service.errors import (
    ImageNotCached,
    InvalidParameter,
    NotKept,
    ResultNotFound,
    StoreUnavailable,
    UnsupportedImage,
)
from service.forms import parse_image_sha256, read_upload, reject_unknown_fields
from service.imaging import SUPPORTED, sniff_format

router = APIRouter(tags=["orders"])

# Tier -> days kept, as the storefront's previous API defined them.
TIERS = {"temporary": 7, "order_pending": 30, "order_completed": 180, "archived": 730}
DEFAULT_TIER = "temporary"
MAX_RESULTS = 24
KEEP_FIELDS = frozenset({"image", "image_sha256", "results", "tier"})
KEPT_CACHE_CONTROL = "public, max-age=86400"
_RESULT_NAME = re.compile(r"([0-9a-f]{64})\.(png|webp|jpeg)")


@dataclass(frozen=True)
class Picture:
    data: bytes
    extension: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def name(self) -> str:
        return kept_object(self.sha256, self.extension)


async def keep_fields(request: Request) -> None:
    await reject_unknown_fields(request, KEEP_FIELDS)


def parse_tier(tier: str) -> tuple[str, int]:
    name = tier.strip().lower()
    if name not in TIERS:
        choices = ", ".join(f"{t} ({d} days)" for t, d in TIERS.items())
        raise InvalidParameter(f"tier {tier!r} is not one of: {choices}")
    return name, TIERS[name]


def parse_results(results: str | None) -> list[tuple[str, str]]:
    """(store object, the name answered back) of each picture named in `results`.

    A result by its URL or `<key>.<ext>` name, as POST /v1/process answered it; or a picture kept
    before, by its kept URL (`.../kept/<sha256>.<ext>`), so a cart's links can be kept longer as they are.
    """
    items = [item for item in re.split(r"[\s,]+", results or "") if item]
    if len(items) > MAX_RESULTS:
        raise InvalidParameter(f"at most {MAX_RESULTS} results can be kept in one request, got {len(items)}")
    parsed: list[tuple[str, str]] = []
    for item in items:
        path = item.split("?", 1)[0].rstrip("/")
        last = path.rsplit("/", 1)[-1]
        if path.rsplit("/", 2)[-2:-1] == ["kept"] and KEPT_NAME.fullmatch(f"kept/{last}"):
            parsed.append((f"kept/{last}", last))
            continue
        match = _RESULT_NAME.fullmatch(last)
        if match is None:
            raise InvalidParameter(
                f"{item!r} is not a result; name each result by its URL or `<key>.<png|webp|jpeg>` "
                "as POST /v1/process answered it, or a kept picture by its URL"
            )
        parsed.append((result_object(match.group(1), match.group(2)), last))
    return list(dict.fromkeys(parsed))


def photo(data: bytes) -> Picture:
    fmt = sniff_format(data)
    if fmt is None or fmt not in KEPT_EXTENSIONS:
        raise UnsupportedImage(f"not a supported image; send {SUPPORTED}")
    return Picture(data, KEPT_EXTENSIONS[fmt])


async def _read(store: ResultStore, name: str) -> bytes | None:
    try:
        return await asyncio.to_thread(store.get, name)
    except StoreError as exc:
        raise StoreUnavailable("the picture store is unavailable; retry shortly") from exc


async def _keep(store: ResultStore, picture: Picture, until: dt.datetime) -> dict[str, Any]:
    try:
        kept_until = await asyncio.to_thread(
            store.keep, picture.name, picture.data, CONTENT_TYPES[picture.extension], until
        )
    except StoreError as exc:
        # Nothing may look kept that is not: the client is told to try again.
        raise NotKept("the picture store is unavailable; not kept yet, retry shortly (keeping again is safe)") from exc
    return {
        "url": store.kept_url(picture.name),
        "sha256": picture.sha256,
        "content_type": CONTENT_TYPES[picture.extension],
        "bytes": len(picture.data),
        "kept_until": _iso(kept_until),
    }


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _until(days: int) -> dt.datetime:
    # Whole seconds: the date answered is the date stored.
    return (now_utc() + dt.timedelta(days=days)).replace(microsecond=0)


ImageField = Annotated[UploadFile | None, File(description="The original photo, sent again.")]
HashField = Annotated[
    str | None, Form(description="sha256 of the original photo, processed here recently, instead of `image`.")
]
ResultsField = Annotated[
    str | None,
    Form(description="Results to keep (URLs or `<key>.<ext>` names) or kept pictures to keep longer (their URLs)."),
]
TierField = Annotated[
    str, Form(description="temporary (7 d) | order_pending (30 d) | order_completed (180 d) | archived (730 d)")
]


@router.post("/v1/keep", dependencies=[Depends(keep_fields)])
async def keep(
    store: StoreDep,
    settings: SettingsDep,
    image: ImageField = None,
    image_sha256: HashField = None,
    results: ResultsField = None,
    tier: TierField = DEFAULT_TIER,
) -> dict[str, Any]:
    """Keep an order's pictures (the original photo and the chosen results) for a tier's days; stable links back."""
    tier_name, days = parse_tier(tier)
    wanted = parse_results(results)
    if image is not None and image_sha256 is not None:
        raise InvalidParameter("send either `image` (the photo) or `image_sha256` (a photo processed here), not both")
    original: Picture | None = None
    if image is not None:
        original = photo(await read_upload(image, settings.max_upload_bytes))
    elif image_sha256 is not None:
        sha = parse_image_sha256(image_sha256)
        data = await _read(store, upload_object(sha))
        if data is None or hashlib.sha256(data).hexdigest() != sha:
            raise ImageNotCached(
                f"the photo {sha} is no longer held here (processed uploads are held for a few days); "
                "send it again in `image`"
            )
        original = photo(data)
    if original is None and not wanted:
        raise InvalidParameter("nothing to keep: send the photo (`image` or `image_sha256`) and/or `results`")

    found = await asyncio.gather(*(_read(store, name) for name, _ in wanted))
    missing = [answered for (_, answered), data in zip(wanted, found, strict=True) if data is None]
    if missing:
        raise ResultNotFound(
            f"no stored result {', '.join(missing)}; results are cached for a limited time, so keep them when "
            "they are added to the cart, or process the photo again"
        )

    until = _until(days)
    pictures = [
        Picture(data, answered.rsplit(".", 1)[1]) for (_, answered), data in zip(wanted, found, strict=True) if data
    ]
    if original is not None:
        pictures.append(original)
    kept = await asyncio.gather(*(_keep(store, picture, until) for picture in pictures))
    answer: dict[str, Any] = {
        "tier": tier_name,
        "days": days,
        "results": {answered: entry for (_, answered), entry in zip(wanted, kept, strict=False)},
    }
    if original is not None:
        answer["original"] = kept[-1]
    return answer


@router.get("/v1/kept/{name}", response_class=Response)
async def kept(name: str, store: StoreDep) -> Response:
    """A kept picture (the local store; on GCS the CDN serves `<cdn>/cache/kept/<name>`)."""
    object_name = f"kept/{name}"
    if KEPT_NAME.fullmatch(object_name) is None:
        raise ResultNotFound(f"{name!r} is not a kept picture; they are named <64 hex sha256>.<extension>")
    data = await _read(store, object_name)
    if data is None:
        raise ResultNotFound(f"no kept picture {name}: never kept, or its keep ended")
    return Response(
        content=data,
        media_type=CONTENT_TYPES[name.rsplit(".", 1)[1]],
        headers={"Cache-Control": KEPT_CACHE_CONTROL, "ETag": f'"{name.split(".", 1)[0]}"'},
    )


@router.post("/store-image", tags=["compatibility"])
async def store_image(
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="The picture: the original photo or a processed one.")],
    session_id: Annotated[str, Form(description="The storefront's session; echoed back.")],
    image_type: Annotated[str, Form(description="original | processed_<effect>; echoed back.")],
    tier: Annotated[str, Form(description="temporary (7 d, default) | order_pending | order_completed | archived")] = (
        DEFAULT_TIER
    ),
    pet_name: Annotated[str | None, Form(description="Accepted and ignored: not stored.")] = None,
    pet_id: Annotated[str | None, Form(description="Accepted and ignored: not stored.")] = None,
    effect_applied: Annotated[str | None, Form(description="Accepted and ignored: not stored.")] = None,
) -> dict[str, Any]:
    """The storefront's previous API: keep one picture for a tier; `{"success": true, "url": ...}`.

    Same mechanism as `POST /v1/keep`. Other fields the old service ignored are ignored here
    too; the pet's name and the other labels are never stored with the picture.
    """
    del pet_name, pet_id, effect_applied
    tier_name, days = parse_tier(tier)
    picture = photo(await read_upload(file, settings.max_upload_bytes))
    kept_entry = await _keep(store, picture, _until(days))
    return {
        "success": True,
        "url": kept_entry["url"],
        "session_id": session_id,
        "image_type": image_type,
        "tier": tier_name,
        "filename": file.filename,
        "kept_until": kept_entry["kept_until"],
        "sha256": kept_entry["sha256"],
    }
