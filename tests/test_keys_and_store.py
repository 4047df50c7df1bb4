"""Content-hash keys and the local result store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from pathlib import Path

import pytest

from cache.keys import Recipe, image_sha256, mask_object, result_object
from cache.store import LocalStore
from effects import EFFECTS
from service.forms import parse_params

BASE = Recipe(
    image_sha256="a" * 64,
    effect="blackwhite",
    effect_version=1,
    model_id="inspyrenet-swinb@abc",
    params={"grain": 0.2},
    background="transparent",
    format="png",
    max_size=2048,
    seed=0,
)


def test_image_sha256_is_the_hash_of_the_bytes() -> None:
    assert image_sha256(b"photo") == hashlib.sha256(b"photo").hexdigest()


def test_same_recipe_same_key_and_every_field_changes_it() -> None:
    assert BASE.result_key() == dataclasses.replace(BASE).result_key()
    changes = {
        "image_sha256": "b" * 64,
        "effect": "popart",
        "effect_version": 2,
        "model_id": "inspyrenet-swinb@def",
        "params": {"grain": 0.3},
        "background": "#ffffff",
        "format": "webp",
        "max_size": 1024,
        "seed": 1,
    }
    keys = {BASE.result_key()}
    for field, value in changes.items():
        keys.add(dataclasses.replace(BASE, **{field: value}).result_key())
    assert len(keys) == len(changes) + 1


@pytest.mark.parametrize("name", [n for n, e in EFFECTS.items() if e.kind == "classic"])
def test_empty_params_and_explicit_defaults_give_the_same_key(name: str) -> None:
    defaults = EFFECTS[name].params().model_dump(mode="json")
    empty = parse_params("{}", (name,))[name].model_dump(mode="json")
    explicit = parse_params(json.dumps({name: defaults}), (name,))[name].model_dump(mode="json")
    assert (
        dataclasses.replace(BASE, effect=name, params=empty).result_key()
        == dataclasses.replace(BASE, effect=name, params=explicit).result_key()
    )


def test_object_names() -> None:
    assert result_object("k" * 64, "png") == f"results/{'k' * 64}.png"
    assert mask_object("a" * 64, "inspyrenet-swinb-1234") == f"masks/{'a' * 64}-inspyrenet-swinb-1234.png"


def test_local_store_roundtrip_and_urls(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, "http://cdn.test/")
    name = result_object("0" * 64, "png")
    assert store.get(name) is None
    store.put(name, b"\x89PNG-bytes", "image/png")
    assert store.get(name) == b"\x89PNG-bytes"
    assert store.result_url("0" * 64, "png") == f"http://cdn.test/v1/results/{'0' * 64}.png"
    with pytest.raises(ValueError, match="not a store object name"):
        store.get("../../etc/passwd")


def test_corrupt_object_reads_as_a_miss_and_is_repaired(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, "http://x")
    name = result_object("1" * 64, "png")
    store.put(name, b"good bytes", "image/png")
    (tmp_path / name).write_bytes(b"rotten bytes")
    assert store.get(name) is None
    store.put(name, b"good bytes", "image/png")
    assert store.get(name) == b"good bytes"


def test_no_partial_object_is_ever_visible(tmp_path: Path) -> None:
    """Readers racing a writer see nothing or the whole object, never a prefix of it."""
    store = LocalStore(tmp_path, "http://x")
    payload = bytes(range(256)) * 8192  # 2 MiB
    names = [result_object(f"{i:064x}", "png") for i in range(20)]
    seen: list[bytes | None] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            for name in names:
                seen.append(store.get(name))

    thread = threading.Thread(target=reader)
    thread.start()
    for name in names:
        store.put(name, payload, "image/png")
    done.set()
    thread.join()
    assert all(data is None or data == payload for data in seen)
    assert all(store.get(name) == payload for name in names)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_local_keep_only_lengthens_replaces_a_corrupt_copy_and_refuses_a_wrong_name(tmp_path: Path) -> None:
    import datetime as dt
    import hashlib

    from cache.keys import kept_object

    store = LocalStore(tmp_path, "http://x")
    data = b"\x89PNG picture bytes"
    name = kept_object(hashlib.sha256(data).hexdigest(), "png")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    week, year = now + dt.timedelta(days=7), now + dt.timedelta(days=365)

    assert store.get(name) is None
    assert store.keep(name, data, "image/png", week) == week
    assert store.keep(name, data, "image/png", year) == year
    assert store.keep(name, data, "image/png", week) == year, "never shortened"
    assert store.get(name) == data
    assert store.kept_url(name) == f"http://x/v1/kept/{name.removeprefix('kept/')}"

    (tmp_path / name).write_bytes(b"rotten")
    assert store.get(name) is None, "a corrupt kept copy is never served"
    assert store.keep(name, data, "image/png", week) == year, "repaired, and its date kept"
    assert store.get(name) == data

    with pytest.raises(ValueError, match="sha256"):
        store.keep(kept_object("0" * 64, "png"), data, "image/png", week)
    with pytest.raises(ValueError, match="not a store object name"):
        store.get("kept/../results/x.png")
