"""POST /warmup: credentials (shared token, Google-signed OIDC against local v1 certs), single flight."""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from google.auth import crypt, jwt

from service.app import create_app
from service.errors import Forbidden
from service.warmup import CertsTransport, WarmupAuth
from tests.support.app import make_settings
from tests.support.server import free_port, running_server
from tests.support.weights import write_inspyrenet

TOKEN = "s3cret-warmup-token-0123456789"
AUDIENCE = "https://cutout.example/warmup"
SCHEDULER = "warmup@cutout-project.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random InSPyReNet weights in the serving layout: the warm-up runs the real forward."""
    directory = tmp_path_factory.mktemp("warmup-models")
    write_inspyrenet(directory)
    return directory


# ------------------------------------------------------------------------ a local Google


def certificate(key: rsa.RSAPrivateKey) -> str:
    """A self-signed X.509 certificate for the key, in PEM: what Google's v1 certs URL serves."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "local-google")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class LocalGoogle:
    """Signs ID tokens like Google does and serves the public certificates as Google's v1 certs
    URL does (`{kid: PEM certificate}`, with a Cache-Control max-age) on loopback."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "local-key-1"
        self.fetches = 0
        self.cache_control = "public, max-age=21600, must-revalidate, no-transform"
        self.served_age_s = 0  # how old the Date header says the answer is
        self.document: Any = {self.kid: certificate(self.key)}
        google = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                google.fetches += 1
                body = json.dumps(google.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Cache-Control", google.cache_control)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def date_time_string(self, timestamp: float | None = None) -> str:
                return super().date_time_string(time.time() - google.served_age_s)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.certs_url = f"http://127.0.0.1:{self.server.server_address[1]}/oauth2/v1/certs"

    def token(self, *, key: rsa.RSAPrivateKey | None = None, kid: str | None = None, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": "https://accounts.google.com",
            "aud": AUDIENCE,
            "azp": "1234567890",
            "email": SCHEDULER,
            "email_verified": True,
            "sub": "1234567890",
            "iat": now,
            "exp": now + 3600,
        }
        claims.update(overrides)
        pem = (key or self.key).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        signer = crypt.RSASigner.from_string(pem, key_id=kid or self.kid)
        return jwt.encode(signer, claims).decode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def google() -> Iterator[LocalGoogle]:
    local = LocalGoogle()
    yield local
    local.close()


def oidc_settings(google: LocalGoogle) -> dict[str, Any]:
    return {"warmup_audience": AUDIENCE, "warmup_service_account": SCHEDULER, "warmup_certs_url": google.certs_url}


# ------------------------------------------------------------------------ tests


def test_shared_token_single_flight_and_cold_start(client_factory: Callable[..., TestClient], models_dir: Path) -> None:
    client = client_factory(warmup_token=TOKEN, models_dir=models_dir)
    engine = client.app.state.engine  # type: ignore[attr-defined]
    batches = engine.forwards_run

    first = client.post("/warmup", headers={"X-Warmup-Token": TOKEN})
    assert first.status_code == 200, first.text
    body = first.json()
    # The first request this process served: it found the instance cold.
    assert body["cold_start"] is True
    assert body["uptime_s"] > 0 and body["model_load_s"] > 0
    assert body["ready"] is True and body["models"]["cutout"]["status"] == "ready"
    assert set(body["timings_ms"]) == {"cutout"} and body["timings_ms"]["cutout"] > 0
    assert engine.forwards_run == batches + 1  # one real forward through the cutout model

    # Without a credential (a browser waking the service): readiness only, no forward pass.
    anonymous = client.post("/warmup", headers={"Origin": "https://shop.example"})
    assert anonymous.status_code == 200 and anonymous.json()["warmed"] is False
    assert anonymous.headers["access-control-allow-origin"] == "https://shop.example"
    wrong = client.post("/warmup", headers={"X-Warmup-Token": TOKEN + "x"})
    assert wrong.status_code == 403 and wrong.json()["code"] == "forbidden"
    assert client.post("/warmup", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert engine.forwards_run == batches + 1  # refused calls never reach the model

    second = client.post("/warmup", headers={"X-Warmup-Token": TOKEN}).json()
    assert second["cold_start"] is False
    assert second["uptime_s"] > body["uptime_s"]
    assert engine.forwards_run == batches + 2

    # Concurrent calls share one run: one forward, the same answer for every caller.
    runner = client.app.state.warmup  # type: ignore[attr-defined]
    batches, runs = engine.forwards_run, runner.runs
    answers: list[Any] = []
    barrier = threading.Barrier(4)

    def call() -> None:
        barrier.wait()
        answers.append(client.post("/warmup", headers={"X-Warmup-Token": TOKEN}))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == 4 and all(answer.status_code == 200 for answer in answers)
    bodies = [answer.json() for answer in answers]
    # One run, one forward; every caller got that run's answer.
    assert runner.runs == runs + 1
    assert engine.forwards_run == batches + 1
    assert all(body == bodies[0] for body in bodies)


def test_warmup_on_a_cold_instance_waits_for_the_models(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, warmup_token=TOKEN, models_dir=models_dir)
    with TestClient(create_app(settings)) as client:  # no waiting: the models are loading now
        assert client.app.state.loading.done() is False  # type: ignore[attr-defined]
        response = client.post("/warmup", headers={"X-Warmup-Token": TOKEN})
        assert response.status_code == 200, response.text
        body = response.json()
    assert body["cold_start"] is True
    assert body["waited_for_models_s"] > 0
    assert body["ready"] is True and body["timings_ms"]["cutout"] > 0


def test_oidc_token_from_the_scheduler_account(client_factory: Callable[..., TestClient], google: LocalGoogle) -> None:
    client = client_factory(**oidc_settings(google))
    fetches = google.fetches
    response = client.post("/warmup", headers={"Authorization": f"Bearer {google.token()}"})
    assert response.status_code == 200, response.text
    assert response.json()["timings_ms"] == {}  # no weights here: nothing to warm, still authorised
    again = client.post("/warmup", headers={"Authorization": f"Bearer {google.token()}"})
    assert again.status_code == 200
    assert google.fetches == fetches + 1  # the keys are cached between calls


def test_certs_are_kept_for_their_max_age_then_fetched_again(tmp_path: Path) -> None:
    """google-auth fetches the certs on every verification; the CacheControl session under it keeps
    them for the answer's Cache-Control max-age (counted from its Date), and a rotated key is found
    once the kept copy is stale."""
    local = LocalGoogle()
    try:
        local.cache_control = "public, max-age=3, must-revalidate, no-transform"
        auth = WarmupAuth(make_settings(tmp_path, **oidc_settings(local)), certs=CertsTransport())
        assert auth.verify_oidc(local.token())["email"] == SCHEDULER
        assert auth.verify_oidc(local.token())["email"] == SCHEDULER
        assert local.fetches == 1

        # Google rotates: a new key is published; tokens signed with it pass once the kept copy is stale.
        new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        local.document = {local.kid: certificate(local.key), "local-key-2": certificate(new_key)}
        rotated = local.token(key=new_key, kid="local-key-2")
        with pytest.raises(Forbidden):
            auth.verify_oidc(rotated)  # still fresh: the kept document does not know the new key
        assert local.fetches == 1
        time.sleep(3.5)
        assert auth.verify_oidc(rotated)["email"] == SCHEDULER
        assert local.fetches == 2

        # An answer whose Date is already older than its max-age is fetched again for every check.
        local.cache_control = "public, max-age=21600, must-revalidate, no-transform"
        local.served_age_s = 21601
        time.sleep(3.5)
        auth.verify_oidc(local.token())
        auth.verify_oidc(local.token())
        assert local.fetches == 4
        # One with 10 minutes of its 6 hours left is kept.
        local.served_age_s = 21000
        auth.verify_oidc(local.token())
        auth.verify_oidc(local.token())
        assert local.fetches == 5

        # An answer that may not be kept is fetched for every verification.
        local.served_age_s, local.cache_control = 0, "no-store"
        time.sleep(0.1)
        auth.verify_oidc(local.token())  # still the kept copy: 10 minutes left
        local.document = {"local-key-2": certificate(new_key)}
        auth.certs.forget(local.certs_url)  # as a new instance starts, with nothing kept
        auth.verify_oidc(rotated)
        auth.verify_oidc(rotated)
        assert local.fetches == 7
    finally:
        local.close()


def test_certs_that_cannot_be_read_are_503_and_not_kept(client_factory: Callable[..., TestClient]) -> None:
    local = LocalGoogle()
    try:
        closed = f"http://127.0.0.1:{free_port()}/oauth2/v1/certs"  # nobody listens there
        down = client_factory(**{**oidc_settings(local), "warmup_certs_url": closed})
        answer = down.post("/warmup", headers={"Authorization": f"Bearer {local.token()}"})
        assert answer.status_code == 503, answer.text
        assert answer.json()["code"] == "service_unavailable" and answer.headers["retry-after"] == "30"
        # A token that is no JWT is refused before any fetch.
        assert down.post("/warmup", headers={"Authorization": "Bearer nope"}).status_code == 403

        # A JWKS (the v3 URL's format) is not what verify_token reads without PyJWT: 503, not kept.
        local.document = {"keys": [{"kty": "RSA", "kid": local.kid, "n": "AQAB", "e": "AQAB"}]}
        client = client_factory(**oidc_settings(local))
        answer = client.post("/warmup", headers={"Authorization": f"Bearer {local.token()}"})
        assert answer.status_code == 503, answer.text
        local.document = {local.kid: certificate(local.key)}
        fixed = client.post("/warmup", headers={"Authorization": f"Bearer {local.token()}"})
        assert fixed.status_code == 200, fixed.text
        assert local.fetches == 2
    finally:
        local.close()


def test_the_started_service_checks_scheduler_tokens(tmp_path: Path) -> None:
    """`python -m service` as the container starts it, configured from the environment as Cloud Run is."""
    local = LocalGoogle()
    env = {
        "CUTOUT_WARMUP_AUDIENCE": AUDIENCE,
        "CUTOUT_WARMUP_SERVICE_ACCOUNT": SCHEDULER,
        "CUTOUT_WARMUP_CERTS_URL": local.certs_url,
    }
    try:
        with running_server(tmp_path, env) as server:
            base = server.url
            for _ in range(2):
                answer = httpx.post(f"{base}/warmup", headers={"Authorization": f"Bearer {local.token()}"}, timeout=60)
                assert answer.status_code == 200, answer.text
                assert answer.json()["warmed"] is True
            intruder = local.token(email="intruder@evil.iam.gserviceaccount.com")
            refused = httpx.post(f"{base}/warmup", headers={"Authorization": f"Bearer {intruder}"}, timeout=60)
            assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
        assert local.fetches == 1  # three checks, one certificate fetch
    finally:
        local.close()


@pytest.mark.parametrize(
    ("overrides", "other_key"),
    [
        ({"aud": "https://elsewhere.example/warmup"}, False),
        ({"email": "intruder@evil.iam.gserviceaccount.com"}, False),
        ({"email_verified": False}, False),
        ({"iss": "https://evil.example"}, False),
        ({"iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, False),
        ({}, True),  # signed by a key Google never published, under Google's key id
    ],
    ids=["audience", "email", "unverified-email", "issuer", "expired", "signature"],
)
def test_oidc_tokens_that_do_not_check_out_are_403(
    client_factory: Callable[..., TestClient], google: LocalGoogle, overrides: dict[str, Any], other_key: bool
) -> None:
    client = client_factory(**oidc_settings(google))
    token = google.token(key=google.other_key if other_key else None, **overrides)
    response = client.post("/warmup", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "forbidden"


def test_oidc_is_refused_when_not_configured(client_factory: Callable[..., TestClient], google: LocalGoogle) -> None:
    client = client_factory(warmup_token=TOKEN)
    response = client.post("/warmup", headers={"Authorization": f"Bearer {google.token()}"})
    assert response.status_code == 403


def test_placeholder_tokens_are_refused_outside_development() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    for token in ("changeme", "dev", "short"):
        with pytest.raises(ValidationError, match="CUTOUT_WARMUP_TOKEN"):
            Settings(environment="production", warmup_token=token)
    with pytest.raises(ValidationError, match="needs a credential"):
        Settings(environment="production")
    with pytest.raises(ValidationError, match="go together"):
        Settings(warmup_audience=AUDIENCE)
    assert Settings(environment="production", warmup_token=TOKEN).warmup_token == TOKEN
    assert Settings(environment="production", warmup_audience=AUDIENCE, warmup_service_account=SCHEDULER)


# ------------------------------------------------------------------------ a browser waking the service


def theme_warmup(client: TestClient) -> Any:
    """The storefront's call as `assets/api-client.js` builds it: fetch POST, JSON content type, a
    plain object as the body (which fetch sends as the text "[object Object]"), from the shop's origin."""
    return client.post(
        "/warmup",
        content=b"[object Object]",
        headers={"Content-Type": "application/json", "Accept": "application/json", "Origin": "https://shop.example"},
    )


def test_a_browser_wakes_the_service_but_never_makes_it_work(
    client_factory: Callable[..., TestClient], models_dir: Path
) -> None:
    client = client_factory(warmup_token=TOKEN, models_dir=models_dir, rate_limit_wake="3/minute")
    engine = client.app.state.engine  # type: ignore[attr-defined]
    runner = client.app.state.warmup  # type: ignore[attr-defined]
    forwards, runs = engine.forwards_run, runner.runs

    answers = [theme_warmup(client) for _ in range(3)]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == "https://shop.example"
        body = answer.json()
        # What the theme reads, and ours: readiness and each effect's state, nothing warmed.
        assert body["model_ready"] is True and body["ready"] is True
        assert isinstance(body["total_time"], float) and body["total_time"] < 1.0
        assert body["warmed"] is False and body["timings_ms"] == {}
        assert body["effect_states"]["cutout"] == "ready" and body["effect_states"]["blackwhite"] == "ready"
        assert "effects" not in body  # the theme's api-client.js would read it as processed images
        assert body["models"]["cutout"]["status"] == "ready"
    assert engine.forwards_run == forwards and runner.runs == runs  # no forward, no warm-up run

    # Rate-limited per client, with CORS, before anything runs.
    refused = theme_warmup(client)
    assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) > 0
    assert refused.headers["access-control-allow-origin"] == "https://shop.example"
    # The Scheduler's authenticated call is not in that budget and still runs the real warm-up.
    scheduled = client.post("/warmup", headers={"X-Warmup-Token": TOKEN})
    assert scheduled.status_code == 200 and scheduled.json()["warmed"] is True
    assert engine.forwards_run == forwards + 1
    # A credential that does not check out is still refused, not treated as a browser.
    assert client.post("/warmup", headers={"X-Warmup-Token": "not-it"}).status_code == 403


def test_a_browser_waking_a_cold_instance_gets_an_answer_at_once(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, warmup_token=TOKEN, models_dir=models_dir)
    with TestClient(create_app(settings)) as client:  # no waiting: the cutout model is loading now
        engine = client.app.state.engine  # type: ignore[attr-defined]
        assert engine.ready is False
        answer = theme_warmup(client)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_ready"] is False and body["ready"] is False
        assert body["effect_states"]["cutout"] == "loading" and body["effect_states"]["blackwhite"] == "ready"
        assert body["cold_start"] is True and body["warmed"] is False
        assert client.app.state.warmup.runs == 0  # type: ignore[attr-defined]
