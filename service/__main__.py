"""`python -m service`: serve Cutout with uvicorn on $HOST:$PORT."""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.settings import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", proxy_headers=False)


if __name__ == "__main__":
    main()
