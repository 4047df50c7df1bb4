"""POST /warmup: who may call it, and one warm-up at a time.

Credentials, either of:
- `X-Warmup-Token: <CUTOUT_WARMUP_TOKEN>` (the shared secret, mounted from Secret Manager),
  compared in constant time;
- `Authorization: Bearer <OIDC ID token>` as Cloud Scheduler sends it: signed by Google (keys
  from `CUTOUT_WARMUP_CERTS_URL`, Google's `{kid: PEM certificate}` map, kept for its
  Cache-Control max-age), issued by accounts.google.com, for the audience
  `CUTOUT_WARMUP_AUDIENCE`, with the verified `email` of `CUTOUT_WARMUP_SERVICE_ACCOUNT`;
  checked by google-auth's `google.oauth2.id_token.verify_token`.

No credential: a browser waking the service (the storefront posts `/warmup` on page load). The
request has done its job by arriving (Cloud Run starts an instance for it); it is answered with
readiness and each model's state, without a forward pass (`wake_answer`), and rate-limited per
client (`CUTOUT_RATE_LIMIT_WAKE`). A credential that does not check out is 403.

Single flight: a call that arrives while a warm-up runs waits for that run and gets its answer,
so a burst of calls (Scheduler retries, two schedulers) costs one forward per model.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import google.auth.transport
from google.auth import exceptions as auth_exceptions
from google.auth import jwt
from google.oauth2 import id_token

from service.errors import Forbidden, ServiceUnavailable, Unauthorized
from service.routes.meta import effect_states, readiness
from service.settings import Settings

log = logging.getLogger("cutout.warmup")

GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
CLOCK_SKEW_S = 30
CERTS_TIMEOUT_S = 10.0


class CertsTransport(google.auth.transport.Request):  # type: ignore[misc]
    """google-auth's requests transport over a CacheControl session, for the certs URL.

    `google.oauth2.id_token` fetches the certificates on every verification and leaves caching to
    the transport; its module docs name CacheControl for it. The session keeps Google's answer for
    its Cache-Control max-age (counted from its Date), revalidates it once stale, and never keeps a
    `no-store` one, so Cloud Scheduler's calls cost no fetch while the keys are fresh. An answer
    that is not a `{kid: PEM certificate}` map (what `verify_token` reads without PyJWT) is refused
    as a transport error, like an unreachable URL: the caller cannot check tokens right now.
    """

    def __init__(self) -> None:
        self._inner: google.auth.transport.Request | None = None  # made on first use: `requests` loads then
        self._cache: Any = None
        self._lock = threading.Lock()

    def _transport(self) -> google.auth.transport.Request:
        with self._lock:
            if self._inner is None:
                import cachecontrol
                import google.auth.transport.requests
                import requests
                from cachecontrol.cache import DictCache

                self._cache = DictCache()
                session = cachecontrol.CacheControl(requests.Session(), cache=self._cache)
                self._inner = google.auth.transport.requests.Request(session=session)
            return self._inner

    def forget(self, url: str) -> None:
        """Drop a kept answer (one that turned out unreadable), so the next check fetches again."""
        from cachecontrol.controller import CacheController

        if self._cache is not None:
            self._cache.delete(CacheController.cache_url(url))

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> google.auth.transport.Response:
        response = self._transport()(
            url, method=method, body=body, headers=headers, timeout=timeout or CERTS_TIMEOUT_S, **kwargs
        )
        if response.status == 200:
            try:
                _check_certs(url, response.data)
            except auth_exceptions.TransportError:
                self.forget(url)
                raise
        return response  # another status: id_token answers it with a TransportError


def _check_certs(url: str, data: bytes) -> None:
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise auth_exceptions.TransportError(f"{url} answered something other than JSON") from exc
    if not isinstance(document, dict) or not document or not all(isinstance(v, str) for v in document.values()):
        raise auth_exceptions.TransportError(
            f"{url} answered no {{kid: PEM certificate}} map; use Google's v1 certs URL "
            "(https://www.googleapis.com/oauth2/v1/certs), not the JWKS one"
        )


class WarmupAuth:
    def __init__(self, settings: Settings, certs: CertsTransport | None = None) -> None:
        self.token = settings.warmup_token
        self.audience = settings.warmup_audience
        self.service_account = settings.warmup_service_account
        self.certs_url = settings.warmup_certs_url
        self.certs = certs or CertsTransport()

    async def check(self, shared_token: str | None, authorization: str | None) -> str:
        """Raise `Unauthorized`/`Forbidden` unless a credential checks out; returns which one did."""
        bearer = None
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                bearer = value.strip()
        if shared_token is None and bearer is None:
            raise Unauthorized(
                "POST /warmup needs a credential: the shared token in X-Warmup-Token, "
                "or a Google-signed OIDC token in Authorization: Bearer"
            )
        if shared_token is not None:
            if self.token and hmac.compare_digest(shared_token.encode(), self.token.encode()):
                return "token"
            if bearer is None:
                raise Forbidden("the X-Warmup-Token is not the configured warm-up token")
        if bearer is not None:
            if not self.audience:
                raise Forbidden("OIDC tokens are not accepted here: CUTOUT_WARMUP_AUDIENCE is not set")
            # A certs fetch is network I/O: off the event loop.
            await asyncio.to_thread(self.verify_oidc, bearer)
            return "oidc"
        raise Forbidden("the X-Warmup-Token is not the configured warm-up token")

    def verify_oidc(self, token: str) -> Mapping[str, Any]:
        try:
            jwt.decode_header(token)  # a token that is no JWT is refused without fetching anything
        except ValueError as exc:
            raise Forbidden("the bearer token is not a JWT") from exc
        try:
            claims: Mapping[str, Any] = id_token.verify_token(
                token,
                self.certs,
                audience=self.audience,
                certs_url=self.certs_url,
                clock_skew_in_seconds=CLOCK_SKEW_S,
            )
        except auth_exceptions.TransportError as exc:
            log.error("could not fetch Google's token-signing keys from %s: %s", self.certs_url, exc)
            raise ServiceUnavailable("cannot check OIDC tokens right now; retry shortly", retry_after=30) from exc
        except ValueError as exc:  # google-auth raises ValueError subclasses for every bad token
            raise Forbidden(f"the OIDC token does not check out: {exc}") from exc
        # What `verify_oauth2_token` checks, which cannot be pointed at another certs URL.
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise Forbidden("the OIDC token was not issued by accounts.google.com")
        if claims.get("email") != self.service_account or claims.get("email_verified") is not True:
            raise Forbidden("the OIDC token is not from the warm-up service account")
        return claims


@dataclass(frozen=True)
class WarmupReport:
    cold_start: bool
    uptime_s: float
    waited_for_models_s: float
    model_load_s: float | None
    timings_ms: dict[str, float]
    ready: bool
    models: dict[str, dict[str, Any]]
    effects: dict[str, str]

    def describe(self) -> dict[str, Any]:
        return {
            "warmed": True,
            "model_ready": self.ready,
            "effects": self.effects,
            "cold_start": self.cold_start,
            "uptime_s": self.uptime_s,
            "waited_for_models_s": self.waited_for_models_s,
            "model_load_s": self.model_load_s,
            "timings_ms": self.timings_ms,
            "ready": self.ready,
            "models": self.models,
        }


def wake_answer(engine: Any, cold_start: bool) -> dict[str, Any]:
    """A browser's `/warmup`: readiness only, in the shape the storefront reads (`model_ready`,
    `total_time` in seconds) and ours (`ready`, each effect's and model's state). No forward pass."""
    started = time.perf_counter()
    body = readiness(engine)
    # assets/api-client.js reads any JSON answer with a top-level `effects` as processed images and
    # base64-decodes each value (so its warm-up would fail): the effects' states go by another name.
    states = body.pop("effects", {})
    return {
        "cold_start": cold_start,
        "warmed": False,
        "timings_ms": {},
        "model_ready": bool(engine.ready),
        **body,
        "effect_states": states,
        "total_time": round(time.perf_counter() - started, 6),
    }


class Warmup:
    """Runs the engine's warm-up forward; concurrent callers share one run and its answer."""

    def __init__(self, engine: Any, loading: asyncio.Task[None] | None) -> None:
        self.engine = engine
        self.loading = loading
        self.runs = 0
        self._current: asyncio.Task[WarmupReport] | None = None

    async def run(self, *, cold_start: bool) -> WarmupReport:
        if self._current is None or self._current.done():
            self._current = asyncio.create_task(self._run(cold_start), name="cutout-warmup")
        # shield: a caller that hangs up must not cancel the run the others wait for.
        return await asyncio.shield(self._current)

    async def _run(self, cold_start: bool) -> WarmupReport:
        self.runs += 1
        started = time.monotonic()
        if self.loading is not None and not self.loading.done():
            # A cold instance: wait for the cutout model (the first stage of the start), then warm
            # what is ready; diffusion pipelines still loading are reported as loading.
            cutout = asyncio.ensure_future(self.engine.cutout_settled.wait())
            try:
                await asyncio.wait({cutout, asyncio.shield(self.loading)}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                cutout.cancel()
        waited = time.monotonic() - started
        timings = await self.engine.warmup()
        return WarmupReport(
            cold_start=cold_start,
            uptime_s=round(time.monotonic() - self.engine.created_at, 3),
            waited_for_models_s=round(waited, 3),
            model_load_s=self.engine.cutout_ready_seconds,
            timings_ms=timings,
            ready=bool(self.engine.ready),
            models=self.engine.describe_models(),
            effects=effect_states(self.engine),
        )
