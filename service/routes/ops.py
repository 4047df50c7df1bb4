"""Operations routes: Cloud Scheduler's warm-up, and the metrics in Prometheus text."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import EngineDep, MetricsDep, SettingsDep, WarmupAuthDep, WarmupDep
from service.telemetry import current_request
from service.warmup import wake_answer

router = APIRouter(tags=["operations"])

TokenHeader = Annotated[str | None, Header(description="The shared warm-up token.")]
BearerHeader = Annotated[str | None, Header(description="Bearer <Google-signed OIDC token>.")]


async def metrics_access(
    auth: WarmupAuthDep,
    settings: SettingsDep,
    x_warmup_token: Annotated[str | None, Header(include_in_schema=False)] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """Open in development; elsewhere the figures are for operators, with the warm-up credential."""
    if settings.environment != "development":
        await auth.check(x_warmup_token, authorization)


@router.post("/warmup")
async def warmup(
    engine: EngineDep,
    runner: WarmupDep,
    auth: WarmupAuthDep,
    x_warmup_token: TokenHeader = None,
    authorization: BearerHeader = None,
) -> dict[str, Any]:
    """Keep an instance warm.

    With a credential (Cloud Scheduler): one tiny real forward through every ready model, and failed
    models loaded again. Without one (a browser waking the service, as the storefront does on page
    load): the request itself has woken the instance; the answer is its readiness and each model's
    state, no forward pass, and it is rate-limited per client. A credential that does not check out
    is still refused (403).
    """
    record = current_request()
    cold_start = record.cold_start if record is not None else False
    if x_warmup_token is None and authorization is None:
        return wake_answer(engine, cold_start)
    await auth.check(x_warmup_token, authorization)
    report = await runner.run(cold_start=cold_start)
    return report.describe()


@router.get("/metrics", response_class=Response, dependencies=[Depends(metrics_access)])
async def metrics(figures: MetricsDep) -> Response:
    """Cache outcomes, stage latency, GPU memory and GPU-seconds per image, in Prometheus text."""
    return Response(figures.prometheus_text(), media_type=CONTENT_TYPE_LATEST)
