"""The upload guard: a byte limit enforced while the body streams in.

A body announced (Content-Length) or streamed beyond the limit is refused with 413 before it
is read in full, so an oversized upload costs neither memory nor disk. The format is sniffed
and decoded later, from the bytes themselves (`service.imaging`).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import UploadTooLarge, error_answer
from service.middleware import HttpMiddleware

# Room for the multipart envelope and the small form fields around the photo itself.
FORM_OVERHEAD_BYTES = 64 * 1024


def too_large_detail(limit: int) -> str:
    return f"the upload is larger than {limit} bytes ({limit / 1_048_576:.0f} MiB); send a smaller photo"


class UploadLimitMiddleware(HttpMiddleware):
    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        super().__init__(app)
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_upload_bytes + FORM_OVERHEAD_BYTES

    def applies(self, scope: Scope) -> bool:
        return scope["method"] in ("POST", "PUT", "PATCH")

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    announced = 0
                if announced > self.max_body_bytes:
                    refusal = UploadTooLarge(too_large_detail(self.max_upload_bytes))
                    await error_answer(refusal)(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise UploadTooLarge(too_large_detail(self.max_upload_bytes))
            return message

        await self.app(scope, limited_receive, send)
