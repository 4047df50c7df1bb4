"""`python -m service`: serve Cutout with uvicorn on $HOST:$PORT."""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.logs import configure_logging
from service.settings import get_settings


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    # log_config=None keeps our handlers; our access line (service.logs) replaces uvicorn's.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
