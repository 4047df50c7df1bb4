"""`python -m service`: serve Cutout with uvicorn on $HOST:$PORT."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.admission import Admission
from service.app import EXIT_CANNOT_SERVE, create_app
from service.logs import configure_logging
from service.settings import get_settings


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining on SIGTERM while it still listens.

    On SIGTERM the app drains at once (`Admission.drain`): `/ready` answers 503 and new
    processing requests `503 shutting_down` with `Retry-After`. The listener stays open while
    requests admitted before the signal run, so a request arriving meanwhile gets that answer
    rather than a refused connection. uvicorn's own shutdown (stop listening, wait for
    connections, cancel what still runs) starts once none is left or the grace
    (`timeout_graceful_shutdown`, counted from the signal) is spent, with what is left of it.
    """

    def __init__(self, config: uvicorn.Config, admission: Admission) -> None:
        super().__init__(config)
        self.admission = admission
        self.sigterm_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.admission.drain()
        if sig == signal.SIGTERM:
            # A graceful stop: uvicorn would re-raise SIGTERM once drained, so the process would
            # end "killed by SIGTERM"; a drained process has done nothing wrong and exits 0.
            if self.sigterm_at is None:
                self.sigterm_at = time.monotonic()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.sigterm_at is not None and not self.should_exit:
            grace_s = float(self.config.timeout_graceful_shutdown or 0.0)
            left_s = grace_s - (time.monotonic() - self.sigterm_at)
            if self.admission.in_flight == 0 or left_s <= 0:
                # uvicorn waits `timeout_graceful_shutdown` from here: only what the drain left.
                self.config.timeout_graceful_shutdown = max(left_s, 0.0)  # type: ignore[assignment]
                self.should_exit = True
        return await super().on_tick(counter)


EXIT_BAD_SETTING = 1


def main() -> None:
    try:
        settings = get_settings()
    except ValidationError as exc:
        # A process that cannot start says why in one place and exits non-zero: Cloud Run shows the
        # message in the revision's logs and does not count the instance as started.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}" for error in exc.errors()
        )
        sys.stderr.write(f"cutout: invalid setting (CUTOUT_* environment variables): {problems}\n")
        sys.exit(EXIT_BAD_SETTING)
    configure_logging(settings)
    app = create_app(settings)
    # log_config=None keeps our handlers; our access line (service.logs) replaces uvicorn's.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        # Annotated int, but uvicorn waits with asyncio.wait_for, which takes any seconds.
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]
    )
    server = DrainingServer(config, app.state.admission)
    exit_code: list[int] = []

    def fail(code: int) -> None:
        # Called on the event loop when the process cannot serve (model loading crashed).
        exit_code.append(code)
        server.should_exit = True

    app.state.fail = fail
    server.run()
    if not server.started:
        # The lifespan's start-up failed (e.g. CUTOUT_DEVICE=cuda without a GPU) or the port was
        # taken: uvicorn has logged why. Non-zero, so Cloud Run restarts the instance instead of
        # counting a clean exit (uvicorn.run exits 3 here too; Server.run alone returns).
        exit_code.append(EXIT_CANNOT_SERVE)
    # Here uvicorn has drained, the lifespan has flushed telemetry, stopped the engine and closed
    # the store: nothing is left to do but exit. Python's own teardown (a final garbage collection
    # over every imported library, joining worker threads still finishing a forward or a weight
    # read) takes seconds, most of what Cloud Run allows between SIGTERM and SIGKILL; skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code[0] if exit_code else 0)


if __name__ == "__main__":
    main()
