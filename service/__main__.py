"""`python -m service`: serve Cutout with uvicorn on $HOST:$PORT."""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

import uvicorn

from service.admission import Admission
from service.app import create_app
from service.logs import configure_logging
from service.settings import get_settings


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app to drain the moment a stop signal arrives.

    uvicorn notices the signal on its next tick (up to 0.1 s later), then stops accepting
    connections and waits up to `timeout_graceful_shutdown` for requests in flight; draining
    first closes the gap in between, and answers `/ready` with 503 for the whole shutdown.
    """

    def __init__(self, config: uvicorn.Config, admission: Admission) -> None:
        super().__init__(config)
        self.admission = admission

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.admission.drain()
        if sig == signal.SIGTERM:
            # A graceful stop: uvicorn would re-raise SIGTERM once drained, so the process would
            # end "killed by SIGTERM"; a drained process has done nothing wrong and exits 0.
            self.should_exit = True
            return
        super().handle_exit(sig, frame)


def main() -> None:
    settings = get_settings()
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
    DrainingServer(config, app.state.admission).run()
    # Here uvicorn has drained, the lifespan has flushed telemetry, stopped the engine and closed
    # the store, and asyncio has joined its worker threads: nothing is left to do but exit.
    # Python's own teardown (a final garbage collection over every imported library) takes
    # 3-5 s on two busy cores, most of what Cloud Run allows between SIGTERM and SIGKILL; skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
