"""POST /warmup: who may call it, and one warm-up at a time.

Credentials, either of:
- `X-Warmup-Token: <CUTOUT_WARMUP_TOKEN>` (the shared secret, mounted from Secret Manager),
  compared in constant time;
- `Authorization: Bearer <OIDC ID token>` as Cloud Scheduler sends it: signed by Google (keys
  from `CUTOUT_WARMUP_CERTS_URL`, a JWKS or a `{kid: PEM certificate}` map, cached), issued by
  accounts.google.com, for the audience `CUTOUT_WARMUP_AUDIENCE`, with the verified `email` of
  `CUTOUT_WARMUP_SERVICE_ACCOUNT`.

No credential: a browser waking the service (the storefront posts `/warmup` on page load). The
request has done its job by arriving (Cloud Run starts an instance for it); it is answered with
readiness and each model's state, without a forward pass (`wake_answer`), and rate-limited per
client (`CUTOUT_RATE_LIMIT_WAKE`). A credential that does not check out is 403.

Single flight: a call that arrives while a warm-up runs waits for that run and gets its answer,
so a burst of calls (Scheduler retries, two schedulers) costs one forward per model.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from service.errors import Forbidden, SigningKeysUnavailable, Unauthorized
from service.readiness import effect_states, readiness
from service.settings import Settings

log = logging.getLogger("cutout.warmup")

GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
CERTS_TTL_S = 3600.0  # Google rotates its signing keys over days and serves them with a long max-age
CERTS_REFRESH_GAP_S = 60.0  # an unknown key id refetches at most this often (bogus tokens cannot flood Google)
CLOCK_SKEW_S = 30
_MAX_AGE = re.compile(r"max-age=(\d+)")


class GoogleCerts:
    """Google's token-signing public keys, fetched from the certs URL and cached."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._keys: dict[str, str] = {}
        self._fetched_at = -float("inf")
        self._ttl_s = CERTS_TTL_S
        self._lock = threading.Lock()

    def keys(self, key_id: str | None) -> dict[str, str]:
        """`{kid: PEM}`; refetched when stale, or when a token names a key we do not have."""
        with self._lock:
            age = time.monotonic() - self._fetched_at
            unknown = key_id is not None and key_id not in self._keys
            if age > self._ttl_s or (unknown and age > CERTS_REFRESH_GAP_S):
                self._keys, self._ttl_s = fetch_keys(self.url)
                self._fetched_at = time.monotonic()
            return dict(self._keys)


def fetch_keys(url: str) -> tuple[dict[str, str], float]:
    import google.auth.transport.requests

    response = google.auth.transport.requests.Request()(url, method="GET", timeout=10)
    if response.status != 200:
        raise OSError(f"{url} answered {response.status}")
    document = json.loads(response.data)
    match = _MAX_AGE.search(response.headers.get("cache-control", ""))
    ttl = min(float(match.group(1)), CERTS_TTL_S) if match else CERTS_TTL_S
    return parse_keys(document), ttl


def parse_keys(document: Any) -> dict[str, str]:
    """A JWKS (`{"keys": [...]}`, RSA keys) or a `{kid: PEM}` map → `{kid: PEM}`."""
    if isinstance(document, dict) and isinstance(document.get("keys"), list):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

        keys: dict[str, str] = {}
        for jwk in document["keys"]:
            if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or "kid" not in jwk:
                continue
            numbers = RSAPublicNumbers(_b64_int(jwk["e"]), _b64_int(jwk["n"]))
            pem = numbers.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            keys[str(jwk["kid"])] = pem.decode("ascii")
        return keys
    if isinstance(document, dict) and all(isinstance(v, str) for v in document.values()):
        return {str(k): v for k, v in document.items()}
    raise ValueError("the certs URL answered neither a JWKS nor a {kid: PEM} map")


def _b64_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


class WarmupAuth:
    def __init__(self, settings: Settings, certs: GoogleCerts | None = None) -> None:
        self.token = settings.warmup_token
        self.audience = settings.warmup_audience
        self.service_account = settings.warmup_service_account
        self.certs = certs or GoogleCerts(settings.warmup_certs_url)

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
            await asyncio.to_thread(self.verify_oidc, bearer)
            return "oidc"
        raise Forbidden("the X-Warmup-Token is not the configured warm-up token")

    def verify_oidc(self, token: str) -> dict[str, Any]:
        from google.auth import jwt

        try:
            header = jwt.decode_header(token)
        except ValueError as exc:
            raise Forbidden("the bearer token is not a JWT") from exc
        try:
            certs = self.certs.keys(header.get("kid"))
        except (OSError, ValueError) as exc:
            log.error("could not fetch Google's token-signing keys from %s: %s", self.certs.url, exc)
            raise SigningKeysUnavailable("cannot check OIDC tokens right now; retry shortly") from exc
        try:
            claims: dict[str, Any] = jwt.decode(
                token, certs=certs, audience=self.audience, clock_skew_in_seconds=CLOCK_SKEW_S
            )
        except ValueError as exc:  # google-auth raises ValueError subclasses for every bad token
            raise Forbidden(f"the OIDC token does not check out: {exc}") from exc
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
