"""Per-client rate limits with slowapi, checked before the upload is read.

Who the client is
-----------------
Behind Google's global external Application Load Balancer (serverless NEG → Cloud Run) the
service receives

    X-Forwarded-For: <whatever the client sent>, <client-ip>, <load-balancer-ip>

The load balancer appends the last two entries; everything before them comes from the client
and can be forged. `CUTOUT_TRUSTED_PROXY_HOPS` (N) says how many entries, counted from the
right, were written by infrastructure we trust, and the client is the leftmost of those: the
N-th entry from the right. Behind the load balancer N = 2:

    X-Forwarded-For: 6.6.6.6, 203.0.113.7, 34.120.5.9      (N = 2)
                     forged   client       load balancer  → the key is 203.0.113.7

so a client that sends its own `X-Forwarded-For: 6.6.6.6` (or a new forged address on every
request) still lands in the bucket of 203.0.113.7. Other layouts:

- N = 0 (local, the default): the header is ignored; the socket peer is the client. uvicorn
  runs with `proxy_headers=False`, so the peer is the raw TCP peer.
- N = 1: one trusted proxy appends the client's address (Cloud Run's own front end on its
  `run.app` URL replaces the header with the caller's address).
- A list shorter than N: the request did not pass every trusted hop (a direct `run.app` call);
  its leftmost entry is then the address the first trusted hop wrote, and it is the key.

IPv6 clients are keyed by their /64: a single subscriber usually holds a whole /64 and could
otherwise step through addresses to escape the limit.

Route families
--------------
`process` (every POST but `/warmup`: uploads that may run the GPU) gets the strict limit,
`read` (results, the effects listing, health, readiness, metrics, documentation) the generous
one, `wake` a `POST /warmup` without a credential (a browser waking the service: answered with
readiness only), and an authenticated `/warmup` none (the credential is checked instead).
Each family is one slowapi *shared* limit, so `POST /v1/process` and `POST /v1/effects/{effect}`
draw on the same budget.

Why a middleware and not slowapi's route decorator: FastAPI reads the whole multipart body
before a route (or its dependencies) runs, so a decorator would let an over-limit client upload
25 MiB before being refused. The middleware checks the limit on the request line and headers
alone. The limiter is slowapi's `Limiter` (one per app, in-memory storage), and each family's
check is a `Limiter.shared_limit`-decorated function, so slowapi parses the limits, keys them and
counts hits.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import RateLimited, error_answer
from service.settings import Settings

log = logging.getLogger("cutout.ratelimit")

Family = Literal["process", "read", "wake"]
WARMUP_PATH = "/warmup"
WARMUP_CREDENTIAL_HEADERS = frozenset({b"x-warmup-token", b"authorization"})

# slowapi logs every refusal with the client's address at WARNING; addresses stay out of our logs.
logging.getLogger("slowapi").setLevel(logging.ERROR)


def client_address(scope: Scope, trusted_proxy_hops: int) -> str:
    """The client's address as the trusted proxies saw it (see the module docstring)."""
    if trusted_proxy_hops > 0:
        entries: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-for":
                # Several header lines are one list, in order (RFC 9110 §5.3).
                entries.extend(part.strip() for part in value.decode("latin-1").split(","))
        entries = [entry for entry in entries if entry]
        if entries:
            chosen = entries[-trusted_proxy_hops] if len(entries) >= trusted_proxy_hops else entries[0]
            return normalise(chosen)
    client = scope.get("client")
    return normalise(client[0]) if client else "unknown"


def normalise(address: str) -> str:
    """One spelling per client: IPv4 as is, IPv6 as its /64, anything else verbatim (bounded)."""
    text = address.strip().strip("[]")
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return text[:64]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


def family_of(scope: Scope) -> Family | None:
    if scope["path"] == WARMUP_PATH:
        credential = any(name in WARMUP_CREDENTIAL_HEADERS for name, _ in scope.get("headers", ()))
        return None if credential else "wake"
    return "process" if scope["method"] == "POST" else "read"


class RateLimits:
    """The app's slowapi limiter and one shared limit per route family."""

    def __init__(self, settings: Settings) -> None:
        self.trusted_proxy_hops = settings.trusted_proxy_hops
        self.limits: dict[Family, str] = {
            "process": settings.rate_limit_process,
            "read": settings.rate_limit_read,
            "wake": settings.rate_limit_wake,
        }
        # moving-window: a client cannot double its budget by straddling a window boundary.
        self.limiter = Limiter(key_func=self.client_key, storage_uri="memory://", strategy="moving-window")
        self._checks: dict[Family, Callable[..., Awaitable[None]]] = {
            family: self._shared_check(family, limit) for family, limit in self.limits.items()
        }

    def client_key(self, request: Request) -> str:
        return client_address(request.scope, self.trusted_proxy_hops)

    def _shared_check(self, family: Family, limit: str) -> Callable[..., Awaitable[None]]:
        async def check(request: Request) -> None:
            return None

        # slowapi registers limits under the function's qualified name: one name per family.
        check.__name__ = check.__qualname__ = f"{family}_family"
        decorated: Callable[..., Awaitable[None]] = self.limiter.shared_limit(limit, scope=family)(check)
        return decorated

    async def check(self, request: Request, family: Family) -> None:
        """Count this request against its family; raise `RateLimited` when over the limit."""
        try:
            await self._checks[family](request=request)
        except RateLimitExceeded as exc:
            retry_after = self._retry_after(request)
            raise RateLimited(
                f"too many requests from this client: the limit for {family} routes is "
                f"{self.limits[family]}; retry in {retry_after} s",
                reset_in_s=retry_after,
            ) from exc

    def _retry_after(self, request: Request) -> int:
        limit, identifiers = request.state.view_rate_limit
        stats = self.limiter.limiter.get_window_stats(limit, *identifiers)
        reset_at: float = stats.reset_time
        return max(1, math.ceil(reset_at - time.time()))


class RateLimitMiddleware:
    """Refuses over-limit clients with 429 before the body is read.

    Added inside the CORS middleware, so the 429 carries CORS headers like every other answer.
    """

    def __init__(self, app: ASGIApp, limits: RateLimits, on_limited: Callable[[Family], None] | None = None) -> None:
        self.app = app
        self.limits = limits
        self.on_limited = on_limited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        family = family_of(scope) if scope["type"] == "http" else None
        if family is None:
            await self.app(scope, receive, send)
            return
        try:
            await self.limits.check(Request(scope), family)
        except RateLimited as exc:
            if self.on_limited is not None:
                self.on_limited(family)
            await error_answer(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)
