"""Every setting of the service, read once from `CUTOUT_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "dev", "development"})


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
    diffusion_effects: list[str] = Field(default_factory=lambda: ["upscale", "enhance", "comic", "aged"])
    diffusion_budget_gb: float = Field(default=16.0, gt=0.0)

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
    public_url: str = "http://127.0.0.1:8080"

    # Upload limits and defaults.
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=50_000_000, ge=4096)
    default_max_size: int = Field(default=2048, ge=64, le=4096)
    png_compress_level: int = Field(default=3, ge=0, le=9)

    # Browsers allowed to call the API (the storefront's origins). "*" allows any origin.
    allowed_origins: list[str] = Field(default_factory=lambda: ["http://localhost:8080", "http://127.0.0.1:8080"])

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


@lru_cache
def get_settings() -> Settings:
    return Settings()
