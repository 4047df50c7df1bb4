"""Links follow the address the client used: `http://<Host header>` for each request.

With the local store (development, `make run`) result and kept-picture links are built from the
scheme, host and port of the request being answered unless `CUTOUT_PUBLIC_URL` fixes them, so a
server on `PORT=9000`, or reached as `http://my-laptop.local:8080` from a phone, answers links
that resolve for that client. The Host header only shapes the answer to the client that sent
it; nothing built from it is stored. The GCS store answers CDN links and ignores it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from cache.store import reset_link_base, set_link_base
from service.middleware import HttpMiddleware


class LinkBaseMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = set_link_base(str(Request(scope).base_url))
        try:
            await self.app(scope, receive, send)
        finally:
            reset_link_base(token)
