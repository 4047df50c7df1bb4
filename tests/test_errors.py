"""The error map: every domain error has exactly one answer, and the real app gives it.

`service.errors.ANSWERS` is the one place an error becomes an HTTP answer. These tests find every
error class the service and the engine define (by importing every module of `service/` and
`effects/`), check each is mapped by name (not through a parent, so a new class is a deliberate
line in the table), and raise each through the app `create_app` builds: the status, `code`,
`Retry-After`, the `{"detail","code"}` shape and CORS are the table's, and none is a 500.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import effects
import service
from effects.engine import EngineError
from service.app import create_app
from service.errors import ANSWERS, Answer, CutoutError, RateLimited
from tests.support.app import make_settings

ORIGIN = "https://shop.example"


def _subclasses(base: type[Exception]) -> set[type[Exception]]:
    found: set[type[Exception]] = set()
    pending = [base]
    while pending:
        for child in pending.pop().__subclasses__():
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def domain_errors() -> set[type[Exception]]:
    """Every error class defined under service/ and effects/ that the service answers on purpose."""
    for package in (service, effects):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if module.name != "service.__main__":
                importlib.import_module(module.name)
    defined = _subclasses(CutoutError) | _subclasses(EngineError)
    return {kind for kind in defined if kind.__module__.split(".")[0] in ("service", "effects")}


def test_every_domain_error_has_exactly_one_mapping() -> None:
    errors = domain_errors()
    assert len(errors) >= 20, sorted(kind.__name__ for kind in errors)  # the walk found the family
    unmapped = sorted(kind.__qualname__ for kind in errors if kind not in ANSWERS)
    assert not unmapped, f"errors with no line in service.errors.ANSWERS (they would answer 500): {unmapped}"
    # Mapped by their own line, not a parent's: no error class derives from another mapped one.
    inherited = sorted(
        f"{kind.__qualname__} < {parent.__qualname__}"
        for kind in errors
        for parent in kind.__mro__[1:]
        if parent in ANSWERS
    )
    assert not inherited, f"an error mapped through its parent's line: {inherited}"
    # And nothing else in the table but these and the one library error the flow lets pass.
    assert set(ANSWERS) == errors | {torch.OutOfMemoryError}
    for answer in ANSWERS.values():
        assert 400 <= answer.status < 600 and answer.status != 500, answer
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", answer.code), answer
        assert answer.retry_after is None or answer.retry_after > 0, answer


def _instance(kind: type[Exception]) -> Exception:
    if kind is RateLimited:
        return RateLimited("too many requests", reset_in_s=7)
    return kind(f"{kind.__name__} happened")


@pytest.fixture(scope="module")
def raising_app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """The real app (its middleware, CORS and handlers), plus a route that raises a named error."""
    app = create_app(make_settings(tmp_path_factory.mktemp("errors")))
    kinds = {kind.__qualname__: kind for kind in ANSWERS}

    async def boom(name: str) -> None:
        raise _instance(kinds[name])

    app.add_api_route("/test-raise/{name}", boom, methods=["GET"])
    return app


@pytest.mark.parametrize("kind", sorted(ANSWERS, key=lambda kind: kind.__qualname__), ids=lambda k: k.__qualname__)
def test_each_error_is_answered_as_its_table_line_says(raising_app: FastAPI, kind: type[Exception]) -> None:
    answer: Answer = ANSWERS[kind]
    client = TestClient(raising_app, raise_server_exceptions=False)
    response = client.get(f"/test-raise/{kind.__qualname__}", headers={"Origin": ORIGIN})
    assert response.status_code == answer.status, response.text
    expected_detail = answer.detail or f"{kind.__name__} happened"
    if kind is RateLimited:
        expected_detail = "too many requests"
    assert response.json() == {"detail": expected_detail, "code": answer.code}
    expected_retry = "7" if kind is RateLimited else answer.retry_after
    assert response.headers.get("retry-after") == (None if expected_retry is None else str(expected_retry))
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_an_error_the_table_does_not_know_is_a_500_with_a_request_id(raising_app: FastAPI) -> None:
    class Stray(Exception):
        pass

    async def stray() -> None:
        raise Stray("a bug")

    raising_app.add_api_route("/test-stray", stray, methods=["GET"])
    response = TestClient(raising_app, raise_server_exceptions=False).get("/test-stray", headers={"Origin": ORIGIN})
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "internal_error" and body["request_id"] == response.headers["x-request-id"]
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_the_flow_chooses_no_status(tmp_path: Path) -> None:
    """Statuses and Retry-Afters are the table's: the request flow names neither."""
    source = (Path(service.__file__).parent / "flow.py").read_text()
    assert "retry_after" not in source and "status_code" not in source
