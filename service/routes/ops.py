"""Operations routes: Cloud Scheduler's warm-up, and the metrics in Prometheus text."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.metrics import Metrics
from service.settings import Settings
from service.telemetry import current_request
from service.warmup import Warmup, WarmupAuth

router = APIRouter(tags=["operations"])


async def require_warmup_credential(
    request: Request,
    x_warmup_token: Annotated[str | None, Header(description="The shared warm-up token.")] = None,
    authorization: Annotated[str | None, Header(description="Bearer <Google-signed OIDC token>.")] = None,
) -> None:
    auth: WarmupAuth = request.app.state.warmup_auth
    await auth.check(x_warmup_token, authorization)


async def metrics_access(
    request: Request,
    x_warmup_token: Annotated[str | None, Header(include_in_schema=False)] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """Open in development; elsewhere the figures are for operators, with the warm-up credential."""
    settings: Settings = request.app.state.settings
    if settings.environment != "development":
        await require_warmup_credential(request, x_warmup_token, authorization)


@router.post("/warmup", dependencies=[Depends(require_warmup_credential)])
async def warmup(request: Request) -> dict[str, Any]:
    """Run one tiny real forward through every loaded model (Cloud Scheduler keeps an instance warm)."""
    runner: Warmup = request.app.state.warmup
    record = current_request()
    report = await runner.run(cold_start=record.cold_start if record is not None else False)
    return report.describe()


@router.get("/metrics", response_class=Response, dependencies=[Depends(metrics_access)])
async def metrics(request: Request) -> Response:
    """Cache outcomes, stage latency, GPU memory and GPU-seconds per image, in Prometheus text."""
    figures: Metrics = request.app.state.metrics
    return Response(figures.prometheus_text(), media_type=CONTENT_TYPE_LATEST)
