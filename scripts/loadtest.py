"""Load test: latency percentiles, throughput, errors and server memory under concurrent uploads.

    .venv/bin/python scripts/loadtest.py --spawn [--requests 300] [--concurrency 8] [--duration-s 600]
    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:8080 [--server-pid PID] ...

Loopback only: `--url` must resolve to 127.0.0.0/8 or ::1, anything else is refused. The run is
bounded by `--requests` and by `--duration-s` (no request starts after it; those in flight get
the request timeout), then it stops by itself.

`--spawn` starts a `make run`-style server (`python -m service` by tests/support/server.py, local
result store, the CPU or GPU it finds) on a free loopback port with random InSPyReNet test weights at the fast size
(written by scripts/make_test_weights.py into `--models-dir`, or a temporary folder), waits for
`/ready`, and stops it with SIGTERM at the end (reporting how long it took to drain and exit).
Its rate limits are raised (`CUTOUT_RATE_LIMIT_*=100000/minute`), as a load test sends every
request from one address; `--server-env NAME=VALUE` sets any other setting (for example
`CUTOUT_MAX_QUEUE=8` to see admission control refuse work).

The mix (`--mix hit=0.5,miss=0.3,fresh=0.15,model=0.05`) draws each request's kind:

- `hit`: a ~2 MB JPEG (`--big-mb`) with a recipe computed once before the run (not timed): every
  one of these must come back from the result cache (`cache: hit`, `X-Cache: HIT`);
- `miss`: the same 2 MB photo with a new seed, so a new result key: decode, a classic effect on
  the original background, encode, store; the miss counterpart of `hit`;
- `fresh`: a new small photo (a new `image_sha256`), one or two classic effects, any format;
- `model`: a new small photo with its background removed: a mask forward of the cutout model
  (micro-batched with other requests in flight), then compositing and an effect.

Requests alternate between `POST /v1/process` (JSON) and `POST /v1/effects/{effect}` (bytes).
Nothing is retried: a 429 or 503 is counted (with whether it carried `Retry-After`), not hidden.
Latency is the client's wall time from sending the first byte to reading the last, per kind.
The server's resident memory (RSS, psutil; `--server-pid`, or the process listening on the URL's
port) is read after priming ("start"), after `--warmup` requests of the same mix if asked for,
sampled during the run (peak) and read at the end. Each reading but the peak comes after
`--settle-s` idle seconds, the time the service takes to hand memory freed after a burst back to
the OS (service/admission.py, `IdleMemoryRelease`); without that, the end reading is the burst's
high-water mark kept by glibc for reuse, not memory in use. "Growth over the run" is the end
minus the later of the start and after-warm-up readings: a leak shows there.

Exit status: 0 when every answer was 2xx, a 429 or 503 with `Retry-After`, or a deliberate 4xx;
1 when any other 5xx (a 500, a 504, a 503 without `Retry-After`) or a transport error happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import photos  # noqa: E402
from tests.support.server import running_server  # noqa: E402

KINDS = ("hit", "miss", "fresh", "model")
DEFAULT_MIX = "hit=0.5,miss=0.3,fresh=0.15,model=0.05"
CLASSIC = ("blackwhite", "dithering", "popart", "retro8bit")
FORMATS = ("png", "webp", "jpeg")
# Recipes of the 2 MB photo computed before the run; `hit` requests replay them.
HIT_RECIPES: tuple[dict[str, str], ...] = (
    {"effects": "popart", "background": "none", "format": "png"},
    {"effects": "dithering", "background": "none", "format": "png"},
    {"effects": "blackwhite", "background": "none", "format": "webp"},
)
MODEL_HIT_RECIPE = {"effects": "cutout", "background": "transparent", "format": "png"}
MB = photos.MB


# ------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Planned:
    kind: str
    route: str  # "process" or "effect"
    fields: dict[str, str]
    image: bytes


def parse_mix(text: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {name!r} in --mix; kinds: {', '.join(KINDS)}")
        try:
            weights[name] = float(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--mix wants name=weight pairs, got {part!r}") from exc
        if weights[name] < 0:
            raise argparse.ArgumentTypeError(f"--mix weight of {name} is negative")
    if sum(weights.values()) <= 0:
        raise argparse.ArgumentTypeError("--mix needs at least one positive weight")
    return weights


def plan(count: int, mix: dict[str, float], big: bytes, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=count)
    recipes = hit_recipes(mix)
    planned: list[Planned] = []
    for index, kind in enumerate(kinds):
        route = "process" if index % 2 == 0 else "effect"
        if kind == "hit":
            fields = dict(rng.choice(recipes))
            planned.append(Planned(kind, route, fields, big))
        elif kind == "miss":
            fields = {"effects": rng.choice(CLASSIC), "background": "none", "format": "png"}
            fields["seed"] = str(1_000_000 + seed * 100_000 + index)  # a new key each time
            planned.append(Planned(kind, route, fields, big))
        elif kind == "fresh":
            width, height = rng.choice(((640, 480), (480, 640), (800, 600), (320, 240)))
            count_effects = 1 if route == "effect" else rng.choice((1, 2))
            fields = {
                "effects": ",".join(rng.sample(CLASSIC, count_effects)),
                "background": "none",
                "format": rng.choice(FORMATS),
            }
            planned.append(
                Planned(kind, route, fields, photos.jpeg(width, height, 10_000 + seed * 10_000 + index, quality=90))
            )
        else:  # model
            fields = {"effects": rng.choice(("cutout", "popart", "retro8bit")), "background": "white", "format": "png"}
            if route == "process":
                fields["background"] = rng.choice(("transparent", "white"))
                if fields["effects"] == "cutout" and fields["background"] == "white":
                    fields["format"] = "jpeg"
            planned.append(
                Planned(kind, route, fields, photos.jpeg(480, 360, 50_000 + seed * 10_000 + index, quality=90))
            )
    return planned


def hit_recipes(mix: dict[str, float]) -> list[dict[str, str]]:
    recipes = list(HIT_RECIPES)
    if mix.get("model", 0) > 0:
        recipes.append(MODEL_HIT_RECIPE)  # a transparent cutout of the 2 MB photo: a 2048 px PNG to look up
    return recipes


# ------------------------------------------------------------------------ running


@dataclass
class Outcome:
    kind: str
    status: int  # 0: transport error
    latency_ms: float
    code: str = ""
    retry_after: bool = False
    cache: str = ""
    error: str = ""


@dataclass
class RunResult:
    outcomes: list[Outcome]
    wall_s: float
    rss_start: int | None  # after priming
    rss_before: int | None  # after the warm-up requests, if any
    rss_after: int | None
    rss_peak: int | None
    not_started: int
    server: dict[str, Any] = field(default_factory=dict)


async def send(client: httpx.AsyncClient, item: Planned) -> Outcome:
    files = {"image": ("photo.jpg", item.image, "image/jpeg")}
    started = time.perf_counter()
    try:
        if item.route == "effect":
            fields = {k: v for k, v in item.fields.items() if k != "effects"}
            response = await client.post(f"/v1/effects/{item.fields['effects']}", data=fields, files=files)
        else:
            response = await client.post("/v1/process", data=item.fields, files=files)
        body = response.content
    except httpx.HTTPError as exc:
        return Outcome(item.kind, 0, (time.perf_counter() - started) * 1000.0, error=exc.__class__.__name__)
    latency_ms = (time.perf_counter() - started) * 1000.0
    outcome = Outcome(item.kind, response.status_code, latency_ms, retry_after="retry-after" in response.headers)
    if response.status_code == 200:
        if item.route == "effect":
            outcome.cache = response.headers.get("x-cache", "").lower()
        else:
            outcomes = {result["cache"] for result in json.loads(body)["results"].values()}
            outcome.cache = outcomes.pop() if len(outcomes) == 1 else "mixed"
    else:
        try:
            outcome.code = str(json.loads(body).get("code", ""))
        except ValueError:
            outcome.code = "not-json"
    return outcome


def server_rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        return int(process.memory_info().rss + sum(child.memory_info().rss for child in process.children(True)))
    except psutil.Error:
        return None


async def prime(client: httpx.AsyncClient, big: bytes, recipes: Sequence[dict[str, str]]) -> None:
    """Compute the `hit` recipes once, so that every timed `hit` finds its result stored."""
    for fields in recipes:
        response = await client.post("/v1/process", data=fields, files={"image": ("photo.jpg", big, "image/jpeg")})
        if response.status_code != 200:
            raise SystemExit(f"priming {fields} failed: {response.status_code} {response.text[:300]}")


async def run(
    url: str,
    planned: list[Planned],
    *,
    warmup: list[Planned],
    settle_s: float,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
    pid: int | None,
    recipes: Sequence[dict[str, str]],
    big: bytes,
) -> RunResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        await prime(client, big, recipes)
        await asyncio.sleep(settle_s)
        rss_start = server_rss(pid)
        if warmup:
            await drive(client, warmup, concurrency, duration_s)
            await asyncio.sleep(settle_s)
        rss_before = server_rss(pid)
        rss_peak = rss_before

        async def sample_rss() -> None:
            nonlocal rss_peak
            while True:
                rss = server_rss(pid)
                if rss is not None and (rss_peak is None or rss > rss_peak):
                    rss_peak = rss
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_rss())
        started = time.perf_counter()
        outcomes, not_started = await drive(client, planned, concurrency, duration_s)
        wall_s = time.perf_counter() - started
        await asyncio.sleep(settle_s)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        rss_after = server_rss(pid)
        return RunResult(outcomes, wall_s, rss_start, rss_before, rss_after, rss_peak, not_started)


async def drive(
    client: httpx.AsyncClient, planned: list[Planned], concurrency: int, duration_s: float
) -> tuple[list[Outcome], int]:
    """Send `planned` with `concurrency` requests in flight; returns the outcomes and how many never started."""
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for item in planned:
        queue.put_nowait(item)
    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + duration_s

    async def worker() -> None:
        while time.monotonic() < stop_at:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            outcomes.append(await send(client, item))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, queue.qsize()


# ------------------------------------------------------------------------ the server


def require_loopback(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"--url must be http://<loopback host>:<port>, got {url!r}")
    port = parts.port or 80
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {parts.hostname!r}: {exc}") from exc
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if outside or not addresses:
        raise SystemExit(
            f"refusing to load-test {url}: {parts.hostname} resolves to {', '.join(outside) or 'nothing'}, "
            "not loopback; this tool only targets a server on this machine"
        )
    return parts.hostname, port


def listening_pid(port: int) -> int | None:
    """The process listening on a loopback TCP port, if the system lets us see it."""
    try:
        connections = psutil.net_connections("tcp")
    except psutil.AccessDenied:
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
            return int(connection.pid) if connection.pid is not None else None
    return None


def ensure_test_weights(models_dir: Path) -> None:
    if (models_dir / "inspyrenet-swinb" / "model.json").is_file():
        return
    from tests.support.weights import write_inspyrenet

    print(f"writing random InSPyReNet test weights (fast size) to {models_dir} ...", flush=True)
    write_inspyrenet(models_dir, "fast", seed=0)


# ------------------------------------------------------------------------ the report


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(result: RunResult, concurrency: int) -> dict[str, Any]:
    outcomes = result.outcomes
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in (*KINDS, "all"):
        chosen = [o for o in outcomes if (kind == "all" or o.kind == kind)]
        ok = [o.latency_ms for o in chosen if o.status == 200]
        if not chosen:
            continue
        by_kind[kind] = {
            "requests": len(chosen),
            "ok": len(ok),
            "p50_ms": percentile(ok, 0.50),
            "p95_ms": percentile(ok, 0.95),
            "p99_ms": percentile(ok, 0.99),
            "mean_ms": statistics.fmean(ok) if ok else float("nan"),
        }
    statuses = Counter(str(o.status) if o.status else f"transport:{o.error}" for o in outcomes)
    refusals = Counter(f"{o.status} {o.code}" for o in outcomes if o.status in (429, 503))
    without_retry_after = sum(1 for o in outcomes if o.status in (429, 503) and not o.retry_after)
    unexpected = [o for o in outcomes if o.status == 0 or (o.status >= 500 and not (o.status == 503 and o.retry_after))]
    hits_not_hits = sum(1 for o in outcomes if o.kind == "hit" and o.status == 200 and o.cache != "hit")
    rss_growth = rss_growth_from_start = None
    if result.rss_before is not None and result.rss_after is not None:
        rss_growth = result.rss_after - result.rss_before
    if result.rss_start is not None and result.rss_after is not None:
        rss_growth_from_start = result.rss_after - result.rss_start
    return {
        "concurrency": concurrency,
        "requests": len(outcomes),
        "not_started": result.not_started,
        "wall_s": result.wall_s,
        "throughput_rps": len(outcomes) / result.wall_s if result.wall_s > 0 else float("nan"),
        "kinds": by_kind,
        "statuses": dict(sorted(statuses.items())),
        "refusals": dict(sorted(refusals.items())),
        "refusals_without_retry_after": without_retry_after,
        "unexpected_failures": len(unexpected),
        "hits_not_served_from_cache": hits_not_hits,
        "rss_start_mb": None if result.rss_start is None else result.rss_start / MB,
        "rss_before_mb": None if result.rss_before is None else result.rss_before / MB,
        "rss_after_mb": None if result.rss_after is None else result.rss_after / MB,
        "rss_peak_mb": None if result.rss_peak is None else result.rss_peak / MB,
        "rss_growth_mb": None if rss_growth is None else rss_growth / MB,
        "rss_growth_from_start_mb": None if rss_growth_from_start is None else rss_growth_from_start / MB,
        "hit_p50_over_miss_p50": (
            by_kind["hit"]["p50_ms"] / by_kind["miss"]["p50_ms"] if "hit" in by_kind and "miss" in by_kind else None
        ),
        "server": result.server,
    }


def print_report(summary: dict[str, Any], big_bytes: int) -> None:
    def ms(value: float) -> str:
        return "-" if value != value else f"{value:8.1f}"  # NaN: no successful request of that kind

    print()
    print(
        f"concurrency {summary['concurrency']}: {summary['requests']} requests in {summary['wall_s']:.1f} s "
        f"= {summary['throughput_rps']:.2f} req/s"
        + (f" ({summary['not_started']} not started: --duration-s reached)" if summary["not_started"] else "")
    )
    print(f"{'kind':<7} {'requests':>8} {'ok':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for kind, row in summary["kinds"].items():
        print(
            f"{kind:<7} {row['requests']:>8} {row['ok']:>5} {ms(row['p50_ms'])} {ms(row['p95_ms'])} "
            f"{ms(row['p99_ms'])} {ms(row['mean_ms'])}"
        )
    print(f"statuses: {summary['statuses']}")
    if summary["refusals"]:
        print(f"refusals: {summary['refusals']} ({summary['refusals_without_retry_after']} without Retry-After)")
    ratio = summary["hit_p50_over_miss_p50"]
    if ratio is not None:
        print(f"cache hit p50 / miss p50 ({big_bytes / MB:.2f} MiB photo): {ratio:.3f}")
    if summary["hits_not_served_from_cache"]:
        print(f"!! {summary['hits_not_served_from_cache']} `hit` requests were not served from the cache")
    if summary["rss_before_mb"] is not None:
        warmed = summary["rss_start_mb"] != summary["rss_before_mb"]
        print(
            f"server RSS: start {summary['rss_start_mb']:.0f} MiB"
            + (f", after warm-up {summary['rss_before_mb']:.0f} MiB" if warmed else "")
            + f", end {summary['rss_after_mb']:.0f} MiB, peak {summary['rss_peak_mb']:.0f} MiB; growth over the run "
            f"{summary['rss_growth_mb']:+.1f} MiB"
            + (f" (from the start {summary['rss_growth_from_start_mb']:+.1f} MiB)" if warmed else "")
        )
    else:
        print("server RSS: unknown (pass --server-pid)")
    if summary["server"]:
        print(f"server: {summary['server']}")
    if summary["unexpected_failures"]:
        print(f"!! {summary['unexpected_failures']} unexpected failures (a 5xx but 503 + Retry-After, or transport)")


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server on loopback (http://127.0.0.1:8080)")
    target.add_argument("--spawn", action="store_true", help="start a server with test weights for the run")
    parser.add_argument("--requests", type=int, default=300, help="requests to send (1-100000)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (1-256)")
    parser.add_argument("--duration-s", type=float, default=600.0, help="no request starts after this many seconds")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX), help=f"default {DEFAULT_MIX}")
    parser.add_argument("--big-mb", type=float, default=2.0, help="size of the photo of `hit` and `miss` (MiB)")
    parser.add_argument("--seed", type=int, default=0, help="the plan's seed: kinds, photos, effects")
    parser.add_argument(
        "--warmup", type=int, default=0, help="requests of the same mix sent first, not counted (0-100000)"
    )
    parser.add_argument("--settle-s", type=float, default=3.0, help="idle seconds before each RSS reading (0-60)")
    parser.add_argument("--timeout-s", type=float, default=330.0, help="client timeout of one request")
    parser.add_argument("--server-pid", type=int, default=None, help="pid of the server, for its RSS")
    parser.add_argument(
        "--models-dir", type=Path, default=None, help="--spawn: weights folder (test weights written if empty)"
    )
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE", help="--spawn: a setting")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 100_000:
        parser.error("--requests must be between 1 and 100000")
    if not 1 <= args.concurrency <= 256:
        parser.error("--concurrency must be between 1 and 256")
    if not 0 <= args.warmup <= 100_000:
        parser.error("--warmup must be between 0 and 100000")
    if not 0 <= args.settle_s <= 60:
        parser.error("--settle-s must be between 0 and 60")
    if not 0 < args.duration_s <= 3600:
        parser.error("--duration-s must be in (0, 3600]")
    server_env: dict[str, str] = {}
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith(("CUTOUT_", "HOST", "PORT")):
            parser.error(f"--server-env wants CUTOUT_NAME=VALUE, got {item!r}")
        server_env[name] = value
    if args.url is not None:
        require_loopback(args.url)  # before anything else: never a request to another machine

    print(f"generating photos (a {args.big_mb:g} MiB JPEG, {args.requests} planned requests) ...", flush=True)
    big = photos.big_jpeg(args.big_mb)
    planned = plan(args.requests, args.mix, big, args.seed)
    # Other photos and seeds than the measured run's, so that warm-up misses stay misses there.
    warmup = plan(args.warmup, args.mix, big, args.seed + 7919) if args.warmup else []
    recipes = hit_recipes(args.mix)

    pid: int | None
    with contextlib.ExitStack() as stack:
        if args.spawn:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cutout-loadtest-")))
            models_dir = args.models_dir or workdir / "models"
            ensure_test_weights(models_dir)
            print("starting the server and waiting for /ready ...", flush=True)
            # The device the machine has (as `make run`), not the tests' CPU.
            env = {"CUTOUT_MODELS_DIR": str(models_dir), "CUTOUT_DEVICE": "auto", **server_env}
            spawned = stack.enter_context(running_server(workdir, env, wait_for="/ready"))
            url, pid = spawned.url, spawned.pid
        else:
            url = args.url.rstrip("/")
            _, port = require_loopback(url)
            pid = args.server_pid or listening_pid(port)
            spawned = None
        print(f"target {url} (server pid {pid}); kinds {dict(Counter(p.kind for p in planned))}", flush=True)
        try:
            result = asyncio.run(
                run(
                    url,
                    planned,
                    warmup=warmup,
                    settle_s=args.settle_s,
                    concurrency=args.concurrency,
                    duration_s=args.duration_s,
                    timeout_s=args.timeout_s,
                    pid=pid,
                    recipes=recipes,
                    big=big,
                )
            )
        except httpx.TransportError as exc:
            raise SystemExit(f"cannot reach {url}: {exc.__class__.__name__}: {exc}") from exc
        if spawned is not None:
            code, seconds = spawned.stop()
            result.server = {"exit_code": code, "sigterm_to_exit_s": round(seconds, 2)}
    summary = summarise(result, args.concurrency)
    summary["big_photo_bytes"] = len(big)
    summary["mix"] = args.mix
    print_report(summary, len(big))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 1 if summary["unexpected_failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
