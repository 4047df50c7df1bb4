"""The results bucket's lifecycle, evaluated: what it deletes, when, in each environment.

The rules in terraform/storage.tf are read with python-hcl2, their `var.`/`local.` references
resolved with each environment's tfvars, and applied to objects the way Cloud Storage's Object
Lifecycle Management does (https://cloud.google.com/storage/docs/lifecycle#conditions): every
condition of a rule must hold, a rule with `matches_prefix` matches names starting with any of
them, `age` is days since the object was written, `days_since_custom_time` is days since its
Custom-Time and does not apply to an object without one; an object matching any Delete rule is
deleted. The storage emulator runs no lifecycle, so this is where the retention table of
docs/storefront.md is checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest

from service.routes.orders import TIERS
from service.settings import Settings
from tests.iac.test_terraform import ENVIRONMENTS, config, default, effective, one, resource

_REFERENCE = re.compile(r"^\$\{(var|local)\.([a-z_]+)\}$")
_CONCAT = re.compile(r"^\$\{concat\((.*)\)\}$")


def resolve(value: Any, environment: str) -> Any:
    """The value of the few expression forms storage.tf uses: `${var.x}`, `${local.x}`, concat of lists."""
    if isinstance(value, list):
        resolved: list[Any] = []
        for item in value:
            resolved.append(resolve(item, environment))
        return resolved
    if not isinstance(value, str):
        return value
    match = _REFERENCE.fullmatch(value)
    if match:
        kind, name = match.groups()
        if kind == "var":
            return effective(name, environment)
        return resolve(config()["locals"][name], environment)
    match = _CONCAT.fullmatch(value)
    if match:
        joined: list[Any] = []
        for part in re.split(r",\s*(?![^\[]*\])", match.group(1)):
            part = part.strip()
            if part.startswith("["):
                items = [f"${{{item.strip()}}}" for item in part.strip("[]").split(",") if item.strip()]
                joined.extend(resolve(items, environment))
            else:
                joined.extend(resolve(f"${{{part}}}", environment))
        return joined
    if value.startswith("${"):
        raise AssertionError(f"storage.tf uses an expression this test cannot evaluate: {value}")
    return value


@dataclass(frozen=True)
class StoredObject:
    name: str
    age_days: float  # since it was (last) written
    days_since_custom_time: float | None = None  # None: no Custom-Time


def rules(environment: str) -> list[dict[str, Any]]:
    bucket = resource("google_storage_bucket", "results")
    resolved = []
    for rule in bucket["lifecycle_rule"]:
        assert one(rule["action"])["type"] == "Delete", "the bucket only deletes; no storage-class moves"
        resolved.append({key: resolve(value, environment) for key, value in one(rule["condition"]).items()})
    return resolved


def matches(condition: dict[str, Any], obj: StoredObject) -> bool:
    known = {"age", "matches_prefix", "days_since_custom_time"}
    assert set(condition) <= known, f"a condition this test does not model: {sorted(set(condition) - known)}"
    if "matches_prefix" in condition and not any(obj.name.startswith(p) for p in condition["matches_prefix"]):
        return False
    if "age" in condition and obj.age_days < condition["age"]:
        return False
    if "days_since_custom_time" in condition:
        since = obj.days_since_custom_time
        return since is not None and since >= condition["days_since_custom_time"]
    return True


def deleted(environment: str, obj: StoredObject) -> bool:
    return any(matches(condition, obj) for condition in rules(environment))


KEY = "a" * 64


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_every_rule_is_scoped_to_a_prefix_and_never_zero(environment: str) -> None:
    for condition in rules(environment):
        # A rule without a prefix would apply to every object in the bucket, kept pictures included.
        assert condition.get("matches_prefix"), condition
        # The provider leaves a 0 out of the request unless told to send it (send_*_if_zero), and a
        # rule left with nothing but a prefix would delete everything under it at once.
        for field in ("age", "days_since_custom_time"):
            if field in condition:
                assert isinstance(condition[field], int) and condition[field] >= 1, condition


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_results_and_masks_expire_with_the_cache(environment: str) -> None:
    days = effective("result_retention_days", environment)
    for name in (f"results/{KEY}.png", f"masks/{KEY}-inspyrenet.png"):
        assert not deleted(environment, StoredObject(name, days - 0.5))
        assert deleted(environment, StoredObject(name, days))


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_processed_uploads_are_held_briefly(environment: str) -> None:
    days = effective("upload_retention_days", environment)
    assert 1 <= days <= 7, "a photo nobody ordered is not kept longer than the storefront's temporary tier"
    assert not deleted(environment, StoredObject(f"uploads/{KEY}", days - 0.5))
    assert deleted(environment, StoredObject(f"uploads/{KEY}", days))


@pytest.mark.parametrize("environment", ENVIRONMENTS)
@pytest.mark.parametrize("tier", sorted(TIERS))
def test_a_kept_picture_lives_its_whole_tier_whatever_the_cache_does(environment: str, tier: str) -> None:
    days = TIERS[tier]
    name = f"kept/{KEY}.png"
    # Written now with Custom-Time = now + days: on day d the Custom-Time is (days - d) ahead.
    for day in range(days + 1):
        alive = StoredObject(name, age_days=day, days_since_custom_time=day - days)
        assert not deleted(environment, alive), f"{tier}: deleted on day {day} of {days}"
    assert deleted(environment, StoredObject(name, age_days=days + 1, days_since_custom_time=1))


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_a_lengthened_keep_outlives_the_cache_and_the_first_tier(environment: str) -> None:
    # Kept as `temporary` on day 0, lengthened to `order_completed` on day 6: Custom-Time = day 186.
    name = f"kept/{KEY}.jpeg"
    for day in (7, 8, effective("result_retention_days", environment), 100, 186):
        assert not deleted(environment, StoredObject(name, age_days=day, days_since_custom_time=day - 186))
    assert deleted(environment, StoredObject(name, age_days=187, days_since_custom_time=1))


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_the_backstop_deletes_kept_pictures_too_old_whatever_their_date(environment: str) -> None:
    limit = effective("kept_max_age_days", environment)
    assert limit >= max(TIERS.values()) + 2, "the longest tier fits inside the backstop"
    name = f"kept/{KEY}.png"
    assert not deleted(environment, StoredObject(name, limit - 1, days_since_custom_time=-30))
    assert deleted(environment, StoredObject(name, limit, days_since_custom_time=-30))
    # And a kept object without a Custom-Time (never written so by the service) still goes.
    assert deleted(environment, StoredObject(name, limit))


def test_the_service_and_the_bucket_agree_on_the_backstop() -> None:
    assert Settings.model_fields["kept_max_age_days"].default == default("kept_max_age_days")


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_prefixes_do_not_overlap(environment: str) -> None:
    prefixes = [p for condition in rules(environment) for p in condition["matches_prefix"]]
    for a in set(prefixes):
        for b in set(prefixes):
            assert a == b or not b.startswith(a), f"{a} also matches {b}"


def test_the_cdn_reads_kept_pictures_but_never_held_uploads() -> None:
    grant = resource("google_storage_bucket_iam_member", "cdn_reads_public_prefixes")
    assert "local.cdn_prefixes" in one(grant["condition"])["expression"]
    readable = resolve(config()["locals"]["cdn_prefixes"], "production")
    assert set(readable) == {"results/", "masks/", "kept/"}
    assert not any("uploads/".startswith(prefix) for prefix in readable)
