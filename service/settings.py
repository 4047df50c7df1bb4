"""Every setting of the service, read once from `CUTOUT_*` environment variables."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "dev", "development"})


def registered_diffusion_effects() -> list[str]:
    """Every diffusion effect of the registry (`effects/__init__.py`), the default of `diffusion_effects`.

    Imported on first use: the registry imports torch, which `import service.settings` alone should not.
    """
    from effects import DIFFUSION_EFFECTS

    return list(DIFFUSION_EFFECTS)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CUTOUT_", extra="ignore", frozen=True)

    environment: Literal["development", "staging", "production"] = "development"

    # Server (`python -m service`). HOST and PORT are read without the prefix, as Cloud Run sets PORT.
    host: str = Field(default="127.0.0.1", validation_alias="HOST")
    port: int = Field(default=8080, ge=1, le=65535, validation_alias="PORT")

    # Models and the device they run on.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    models_dir: Path = Path("models")
    cutout_model: str = Field(default="inspyrenet-swinb", pattern=r"^[a-z0-9][a-z0-9._-]*$")
    compile_model: bool = False
    mask_batch_size: int = Field(default=8, ge=1, le=64)
    mask_batch_wait_ms: float = Field(default=5.0, ge=0.0, le=1000.0)
    # Which of the registry's diffusion effects to load (their weights, fetched at image build from
    # the Hub ids in the registry, are in the image; the service never touches the Hub).
    diffusion_effects: Annotated[list[str], NoDecode] = Field(default_factory=registered_diffusion_effects)

    # Result cache.
    cache_backend: Literal["local", "gcs"] = "local"
    cache_dir: Path = Path("data/cache")
    gcs_bucket: str = ""
    cdn_url: str = ""
    # A dead store must never hold requests up: each storage call has a short timeout, retries
    # stop after a short deadline, and after a failure the store is skipped for a cool-down.
    gcs_timeout_s: float = Field(default=10.0, gt=0.0, le=120.0)
    gcs_retry_deadline_s: float = Field(default=2.0, ge=0.0, le=60.0)
    gcs_failure_cooldown_s: float = Field(default=15.0, ge=0.0, le=600.0)
    # Base of the links the local store answers (results, kept pictures). Empty: the scheme, host
    # and port each request came in by, so `PORT=9000 make run` answers links that resolve.
    public_url: str = ""
    # Kept pictures (docs/storefront.md): the bucket deletes a kept object this many days after it
    # was written whatever its keep-until date; a longer keep renews the object. Keep it equal to
    # terraform's kept_max_age_days; 732 at least: the longest tier (730 days) and a day of grace.
    kept_max_age_days: int = Field(default=1095, ge=732, le=3650)

    # Upload limits and defaults.
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=50_000_000, ge=4096)
    default_max_size: int = Field(default=2048, ge=64, le=4096)
    png_compress_level: int = Field(default=1, ge=0, le=9)  # zlib-ng level; see docs/codecs.md

    # Admission and shutdown (service/admission.py, docs/capacity.md). Processing requests an
    # instance holds at once, from admission to answer; beyond it: 503 overloaded, body unread.
    # Keep it at or above Cloud Run's max_instance_request_concurrency (8 in terraform/).
    max_queue: int = Field(default=32, ge=1, le=1000)
    # Deadline of one processing request, body read included: 504 deadline_exceeded past it.
    # Cloud Run's request timeout (300 s in terraform/) minus 10 s, so the service answers first.
    request_timeout_s: float = Field(default=290.0, gt=0.0, le=3600.0)
    # After SIGTERM: how long requests in flight may run on. Cloud Run sends SIGKILL 10 s after
    # SIGTERM, and the telemetry flush needs what is left.
    shutdown_grace_s: float = Field(default=8.0, gt=0.0, lt=10.0)

    # Browsers allowed to call the API (the storefront's origins). "*" allows any origin.
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://localhost:8080", "http://127.0.0.1:8080"]
    )
    # Origins matched by a regular expression (whole origin), on top of the list: Shopify's theme
    # previews come from a new `https://<id>.shopifypreview.com` origin every few days. Empty: none.
    allowed_origin_regex: str = ""

    # Operations (docs/operations.md). Rate limits are per client and route family, in the
    # `limits` notation ("30/minute", "5/second;100/hour").
    # How many X-Forwarded-For entries, counted from the right, were written by infrastructure we
    # trust; the client is the leftmost of them. 0: no proxy in front, the socket peer is the client.
    trusted_proxy_hops: int = Field(default=0, ge=0, le=10)
    rate_limit_process: str = "30/minute"
    rate_limit_read: str = "600/minute"
    # POST /warmup without a credential (the storefront wakes the service from a browser).
    rate_limit_wake: str = "10/minute"
    # POST /warmup: the shared token in `X-Warmup-Token`, or a Google-signed OIDC token (Cloud
    # Scheduler) for this audience, signed as this service account.
    warmup_token: str = ""
    warmup_audience: str = ""
    warmup_service_account: str = ""
    warmup_certs_url: str = "https://www.googleapis.com/oauth2/v1/certs"
    trace_export: Literal["none", "cloud_trace"] = "none"
    metrics_export: Literal["none", "cloud_monitoring"] = "none"
    # Cloud Monitoring accepts one point per series every 5 s at most.
    metrics_interval_s: float = Field(default=60.0, ge=5.0, le=3600.0)
    # host:port of the Monitoring API; empty for Google's. A loopback address is plain gRPC (tests).
    metrics_endpoint: str = ""
    gcp_project: str = ""
    gcp_region: str = "global"
    revision: str = Field(default="local", validation_alias="K_REVISION")
    # What one second of the L4 instance costs. Cloud Run, Tier 1 region, instance-based billing
    # (https://cloud.google.com/run/pricing; Cloud Billing SKUs for us-central1, 2026-08; docs/cost.md):
    # L4 with zonal redundancy $0.0002909/s (without: $0.0001867/s) + 8 vCPU x $0.000018/s
    # + 32 GiB x $0.000002/s, the production shape in terraform/. Set it for other shapes.
    l4_usd_per_second: float = Field(default=0.000499, ge=0.0)
    # `json` lines for Cloud Logging, `text` for a terminal; `auto`: text in development, else json.
    log_format: Literal["auto", "json", "text"] = "auto"

    @property
    def log_lines(self) -> Literal["json", "text"]:
        if self.log_format == "auto":
            return "text" if self.environment == "development" else "json"
        return self.log_format

    @field_validator("diffusion_effects", "allowed_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """Lists come as JSON (`["a","b"]`) or comma-separated (`a,b`) from the environment."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("allowed_origin_regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"allowed_origin_regex is not a regular expression: {exc}") from exc
        return value

    @field_validator("diffusion_effects")
    @classmethod
    def _known_diffusion_effects(cls, value: list[str]) -> list[str]:
        known = registered_diffusion_effects()
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown diffusion effect {', '.join(unknown)}; choose from {', '.join(known)}")
        return list(dict.fromkeys(value))

    @field_validator("public_url", "cdn_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_backend(self) -> Settings:
        if self.cache_backend == "gcs" and not self.gcs_bucket:
            raise ValueError("CUTOUT_CACHE_BACKEND=gcs needs CUTOUT_GCS_BUCKET (the bucket holding results)")
        if self.cache_backend == "gcs" and not self.cdn_url:
            raise ValueError("CUTOUT_CACHE_BACKEND=gcs needs CUTOUT_CDN_URL (the CDN base URL serving /cache/*)")
        return self

    @field_validator("rate_limit_process", "rate_limit_read", "rate_limit_wake")
    @classmethod
    def _parse_rate_limit(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a rate limit; write it like 30/minute or 5/second;100/hour") from exc
        return value

    @model_validator(mode="after")
    def _check_operations(self) -> Settings:
        if bool(self.warmup_audience) != bool(self.warmup_service_account):
            raise ValueError(
                "CUTOUT_WARMUP_AUDIENCE and CUTOUT_WARMUP_SERVICE_ACCOUNT go together: an OIDC token is "
                "checked for both its audience and the service account that signed it"
            )
        if self.environment != "development":
            token = self.warmup_token
            if token and (token.strip().lower() in PLACEHOLDER_SECRETS or len(token) < 16):
                raise ValueError(
                    "CUTOUT_WARMUP_TOKEN looks like a placeholder; outside development use a random secret "
                    "of 16 characters or more (e.g. `openssl rand -hex 32`), or leave it empty and use OIDC"
                )
            if not token and not self.warmup_audience:
                raise ValueError(
                    "outside development /warmup needs a credential: set CUTOUT_WARMUP_TOKEN, or "
                    "CUTOUT_WARMUP_AUDIENCE and CUTOUT_WARMUP_SERVICE_ACCOUNT for Cloud Scheduler's OIDC token"
                )
        exporting = self.trace_export != "none" or self.metrics_export != "none"
        if exporting and not self.gcp_project:
            raise ValueError("CUTOUT_TRACE_EXPORT / CUTOUT_METRICS_EXPORT need CUTOUT_GCP_PROJECT (the project id)")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
