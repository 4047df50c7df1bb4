#!/usr/bin/env python3
"""Ship a Cutout image to Cloud Run as a canary, prove it, promote it, or put the old revision back.

What .github/workflows/deploy.yml runs, step by step, and what an operator runs by hand:

    deploy    create a revision from an image with no traffic, tagged `canary`; print its canary URL
    smoke     GET /ready, one real POST /v1/process with a generated PNG, then fetch the result
    promote   send a percentage of the traffic to the canary
    check     let traffic soak, then fail if the revision answered too many 5xx (Cloud Monitoring)
    untag     remove every revision tag but `canary` (old releases stop being addressable)
    rollback  all traffic and the `canary` tag back to the revision that served before, other tags removed
    status    show which revisions get traffic

Releases own the image, the traffic split and the tags; Terraform owns the rest of the revision
template (terraform/cloud_run.tf). The canary is reached through the load balancer at
<public URL>/canary/ (a route to the revision tagged `canary`), so it is smoke-tested behind the same
Cloud Armor policy and X-Forwarded-For as customers, and the service's ingress can stay closed to the
internet.

The project, region, service and public URL come from --project/--region/--service/--public-url or
from the environment (GCP_PROJECT_ID, GCP_REGION, CLOUD_RUN_SERVICE, PUBLIC_URL), the same variables
the workflow sets. Only the standard library and the gcloud CLI are needed; under GitHub Actions,
values the later steps need are appended to $GITHUB_OUTPUT.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

Gcloud = Callable[[Sequence[str]], str]

MONITORING_API = "https://monitoring.googleapis.com/v3"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The revision tag the load balancer's canary route points at, and that route's path prefix
# (terraform/main.tf locals canary_tag and canary_path hold the same values).
CANARY_TAG = "canary"
CANARY_PATH = "/canary/"


class DeployError(Exception):
    """A step failed in a way the operator must look at; the message says what and where."""


# ---------------------------------------------------------------- pure helpers


def canary_url(public_url: str) -> str:
    """`https://cutout.example.com` -> `https://cutout.example.com/canary` (the load balancer's canary route)."""
    if not public_url.startswith("https://"):
        raise DeployError(f"the public URL must be https://<domain>, not {public_url!r} (set PUBLIC_URL)")
    return public_url.rstrip("/") + CANARY_PATH.rstrip("/")


def traffic_targets(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The service's current traffic split (status.traffic of `gcloud run services describe`)."""
    targets = service.get("status", {}).get("traffic", [])
    latest = service.get("status", {}).get("latestReadyRevisionName")
    resolved = []
    for target in targets:
        entry = dict(target)
        if not entry.get("revisionName") and entry.get("latestRevision"):
            entry["revisionName"] = latest
        resolved.append(entry)
    return resolved


def serving_revision(service: Mapping[str, Any], excluding: str | None = None) -> str | None:
    """The revision with the largest share of traffic (the one to return to on rollback)."""
    best: tuple[int, str] | None = None
    for target in traffic_targets(service):
        name = target.get("revisionName")
        percent = int(target.get("percent") or 0)
        if not name or percent <= 0 or name == excluding:
            continue
        if best is None or percent > best[0]:
            best = (percent, name)
    return best[1] if best else None


def tagged_revision(service: Mapping[str, Any], tag: str) -> str:
    """The revision a tag points at."""
    for target in traffic_targets(service):
        if target.get("tag") == tag and target.get("revisionName"):
            return str(target["revisionName"])
    raise DeployError(f"no revision carries the tag {tag!r}; `gcloud run services describe` shows none")


def tags_except(service: Mapping[str, Any], keep: str) -> list[str]:
    """Every revision tag on the service but `keep`, in the order the traffic list names them."""
    tags = [str(target["tag"]) for target in traffic_targets(service) if target.get("tag")]
    return [tag for index, tag in enumerate(tags) if tag != keep and tag not in tags[:index]]


def image_without_reference(image: str) -> str:
    """`…/cutout:v1` or `…/cutout@sha256:…` -> `…/cutout`."""
    if "@" in image:
        return image.split("@", 1)[0]
    # A ':' after the last '/' starts the tag (one before it would be a registry port).
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


def png_bytes(width: int = 64, height: int = 64) -> bytes:
    """A small RGB PNG with a subject: a warm disc on a cool gradient, so the cutout has an edge to find."""
    rows = bytearray()
    cx, cy, radius_sq = width / 2, height / 2, (min(width, height) / 3) ** 2
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            if (x - cx) ** 2 + (y - cy) ** 2 <= radius_sq:
                rows += bytes((230, 140, 60))
            else:
                rows += bytes((40, 90 + 100 * y // height, 200))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b"")


def multipart(fields: Mapping[str, str], files: Mapping[str, tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """multipart/form-data body and its Content-Type; files map name -> (filename, content type, bytes)."""
    boundary = f"cutout-smoke-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, content_type, data) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def error_counts(time_series: Mapping[str, Any]) -> tuple[int, int]:
    """(5xx responses, all responses) from a timeSeries.list answer grouped by response_code_class."""
    errors = total = 0
    for series in time_series.get("timeSeries", []):
        code_class = series.get("metric", {}).get("labels", {}).get("response_code_class", "")
        count = sum(int(point["value"].get("int64Value", 0)) for point in series.get("points", []))
        total += count
        if code_class == "5xx":
            errors += count
    return errors, total


# ---------------------------------------------------------------- I/O


@dataclass(frozen=True)
class Target:
    project: str
    region: str
    service: str

    def flags(self) -> list[str]:
        return ["--project", self.project, "--region", self.region]


def run_gcloud(args: Sequence[str]) -> str:
    command = ["gcloud", *args]
    print("+", " ".join(command), file=sys.stderr)
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise DeployError(f"`{' '.join(command)}` failed ({done.returncode}):\n{done.stderr.strip()}")
    return done.stdout


def describe(gcloud: Gcloud, target: Target) -> dict[str, Any]:
    out = gcloud(["run", "services", "describe", target.service, *target.flags(), "--format=json"])
    service: dict[str, Any] = json.loads(out)
    return service


def http(
    method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None, timeout: float = 300
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def github_output(values: Mapping[str, str]) -> None:
    path = os.environ.get("GITHUB_OUTPUT")
    for key, value in values.items():
        print(f"{key}={value}")
    if path:
        with Path(path).open("a", encoding="utf-8") as handle:
            handle.writelines(f"{key}={value}\n" for key, value in values.items())


# ---------------------------------------------------------------- commands


def deploy(
    gcloud: Gcloud,
    target: Target,
    image: str,
    public_url: str,
    report: Callable[[Mapping[str, str]], None] = lambda values: None,
) -> dict[str, str]:
    """A new revision of `image` receiving no traffic, carrying the `canary` tag (moved from wherever it was).

    The serving revision is reported before anything changes: if the deploy fails half-way (the new
    revision never becomes ready, after the tag was freed), the rollback still knows where to go.
    """
    canary = canary_url(public_url)
    before = describe(gcloud, target)
    previous = serving_revision(before) or ""
    report({"previous_revision": previous, "canary_url": canary})

    # Deploy the digest, not the tag: the revision then names exactly the bytes that were built.
    digest = gcloud(["artifacts", "docker", "images", "describe", image, "--format=value(image_summary.digest)"])
    digest = digest.strip()
    if not digest.startswith("sha256:"):
        raise DeployError(f"could not resolve {image} to a digest (got {digest!r})")
    pinned = f"{image_without_reference(image)}@{digest}"

    # Free the tag first (after a release it sits on the serving revision), so the deploy below only
    # has to add it; until the new revision is up, /canary/ answers an error rather than anything old.
    if any(target_.get("tag") == CANARY_TAG for target_ in traffic_targets(before)):
        gcloud(["run", "services", "update-traffic", target.service, *target.flags(), "--remove-tags", CANARY_TAG])
    gcloud(
        [
            "run",
            "deploy",
            target.service,
            *target.flags(),
            "--image",
            pinned,
            "--no-traffic",
            "--tag",
            CANARY_TAG,
            "--quiet",
        ]
    )
    revision = tagged_revision(describe(gcloud, target), CANARY_TAG)
    if revision == previous:
        raise DeployError(f"the {CANARY_TAG!r} tag still points at the serving revision {revision}: no new revision")
    return {
        "tag": CANARY_TAG,
        "revision": revision,
        "canary_url": canary,
        "previous_revision": previous,
        "image": pinned,
    }


def wait_ready(url: str, deadline_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
    """GET /ready until 200. A cold revision holds the first request until its startup probe passes."""
    give_up = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < give_up:
        try:
            status, _, body = http("GET", f"{url}/ready", timeout=300)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            last = f"{type(error).__name__}: {error}"
        else:
            if status == 200:
                return
            last = f"{status}: {body[:300]!r}"
        sleep(10)
    raise DeployError(f"{url}/ready did not answer 200 within {deadline_s:.0f} s (last: {last})")


def smoke(url: str, ready_deadline_s: float = 900, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Readiness, one real cutout through the whole stack, and the result read back from where it points."""
    url = url.rstrip("/")
    wait_ready(url, ready_deadline_s, sleep)

    body, content_type = multipart({"effects": "cutout"}, {"image": ("smoke.png", "image/png", png_bytes())})
    status, _, answer = http("POST", f"{url}/v1/process", body, {"Content-Type": content_type}, timeout=600)
    if status != 200:
        raise DeployError(f"POST {url}/v1/process answered {status}: {answer[:500]!r}")
    try:
        result = json.loads(answer)["results"]["cutout"]
        result_url = str(result["url"])
    except (ValueError, KeyError, TypeError) as error:
        raise DeployError(f"POST {url}/v1/process answered 200 without results.cutout.url: {answer[:500]!r}") from error

    status, headers, image = http("GET", result_url, timeout=120)
    if status != 200 or not image.startswith(PNG_SIGNATURE):
        raise DeployError(f"the result {result_url} answered {status} ({headers.get('Content-Type')}), not a PNG")
    print(f"smoke ok: {url} made {result_url} ({len(image)} bytes)", file=sys.stderr)
    return dict(result)


def promote(gcloud: Gcloud, target: Target, percent: int, tag: str = CANARY_TAG) -> None:
    if not 0 < percent <= 100:
        raise DeployError(f"--percent must be 1..100, not {percent}")
    gcloud(["run", "services", "update-traffic", target.service, *target.flags(), "--to-tags", f"{tag}={percent}"])


def untag(gcloud: Gcloud, target: Target, keep: str = CANARY_TAG) -> list[str]:
    """Remove every tag but `keep`: an old revision with a tag stays addressable and can scale on its own."""
    stale = tags_except(describe(gcloud, target), keep)
    if stale:
        gcloud(["run", "services", "update-traffic", target.service, *target.flags(), "--remove-tags", ",".join(stale)])
    return stale


def rollback(gcloud: Gcloud, target: Target, revision: str) -> None:
    """All traffic to `revision` first (the part that matters, and the fastest), then the tags."""
    update = ["run", "services", "update-traffic", target.service, *target.flags()]
    gcloud([*update, "--to-revisions", f"{revision}=100"])
    gcloud([*update, "--update-tags", f"{CANARY_TAG}={revision}"])
    untag(gcloud, target)


def request_counts(gcloud: Gcloud, target: Target, revision: str, since: datetime, until: datetime) -> tuple[int, int]:
    """(5xx, all) responses of one revision between two instants, from Cloud Monitoring."""
    window = max(60, int((until - since).total_seconds()))
    query = {
        "filter": (
            'metric.type = "run.googleapis.com/request_count" AND resource.type = "cloud_run_revision" AND '
            f'resource.labels.service_name = "{target.service}" AND resource.labels.revision_name = "{revision}"'
        ),
        "interval.startTime": since.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "interval.endTime": until.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "aggregation.alignmentPeriod": f"{window}s",
        "aggregation.perSeriesAligner": "ALIGN_SUM",
        "aggregation.crossSeriesReducer": "REDUCE_SUM",
        "aggregation.groupByFields": "metric.label.response_code_class",
    }
    token = gcloud(["auth", "print-access-token"]).strip()
    url = f"{MONITORING_API}/projects/{target.project}/timeSeries?{urllib.parse.urlencode(query)}"
    status, _, body = http("GET", url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    if status != 200:
        raise DeployError(f"Cloud Monitoring answered {status}: {body[:500]!r}")
    return error_counts(json.loads(body))


def check(
    gcloud: Gcloud,
    target: Target,
    revision: str,
    soak_s: float,
    max_error_ratio: float,
    probe_url: str | None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, int]:
    """Soak, probing the revision so it is exercised, then compare its 5xx ratio with the limit."""
    started = datetime.now(UTC) - timedelta(seconds=60)
    give_up = time.monotonic() + soak_s
    while time.monotonic() < give_up:
        if probe_url:
            wait_ready(probe_url.rstrip("/"), deadline_s=300, sleep=sleep)
        sleep(min(30.0, max(0.0, give_up - time.monotonic())))
    errors, total = request_counts(gcloud, target, revision, started, datetime.now(UTC))
    ratio = errors / total if total else 0.0
    print(f"{revision}: {errors} of {total} responses were 5xx ({ratio:.2%}) during the soak", file=sys.stderr)
    if ratio > max_error_ratio:
        raise DeployError(f"{revision} answered {ratio:.2%} 5xx, more than the allowed {max_error_ratio:.2%}")
    return errors, total


def status(gcloud: Gcloud, target: Target) -> None:
    for entry in traffic_targets(describe(gcloud, target)):
        tag = entry.get("tag") or ""
        print(f"{int(entry.get('percent') or 0):>3}%  {entry.get('revisionName')}  {tag}  {entry.get('url') or ''}")


# ---------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    main.add_argument("--project", default=os.environ.get("GCP_PROJECT_ID"))
    main.add_argument("--region", default=os.environ.get("GCP_REGION"))
    main.add_argument("--service", default=os.environ.get("CLOUD_RUN_SERVICE", "cutout"))
    main.add_argument("--public-url", default=os.environ.get("PUBLIC_URL", ""), help="https://<domain>")
    commands = main.add_subparsers(dest="command", required=True)

    p = commands.add_parser("deploy", help="new revision with no traffic, tagged canary")
    p.add_argument(
        "--image", required=True, help="image with its tag, e.g. REGION-docker.pkg.dev/P/cutout/cutout:v1.2.0"
    )

    p = commands.add_parser("smoke", help="readiness + one real /v1/process + the result fetched back")
    p.add_argument("--url", required=True, help="base URL: the canary URL (<public URL>/canary) or the public URL")
    p.add_argument("--ready-deadline", type=float, default=900, help="seconds to wait for /ready (cold start)")

    p = commands.add_parser("promote", help="send a share of the traffic to the canary")
    p.add_argument("--percent", type=int, required=True)

    p = commands.add_parser("check", help="soak, then fail on too many 5xx from the revision")
    p.add_argument("--revision", required=True)
    p.add_argument("--soak", type=float, default=300, help="seconds of traffic to judge")
    p.add_argument("--max-error-ratio", type=float, default=0.02)
    p.add_argument("--probe-url", help="URL to GET /ready on during the soak (the canary URL)")

    p = commands.add_parser("rollback", help="all traffic back to a revision")
    p.add_argument("--to-revision", required=True, help="the revision that served before (deploy prints it)")

    commands.add_parser("untag", help="remove every revision tag but canary")

    commands.add_parser("status", help="the current traffic split")
    return main


def main(argv: Sequence[str] | None = None, gcloud: Gcloud = run_gcloud) -> int:
    args = parser().parse_args(argv)
    if args.command != "smoke" and not (args.project and args.region):
        print("set --project and --region (or GCP_PROJECT_ID and GCP_REGION)", file=sys.stderr)
        return 2
    target = Target(args.project or "", args.region or "", args.service)
    try:
        if args.command == "deploy":
            result = deploy(gcloud, target, args.image, args.public_url, report=github_output)
            github_output(
                {key: value for key, value in result.items() if key not in ("previous_revision", "canary_url")}
            )
        elif args.command == "smoke":
            smoke(args.url, args.ready_deadline)
        elif args.command == "promote":
            promote(gcloud, target, args.percent)
        elif args.command == "check":
            check(gcloud, target, args.revision, args.soak, args.max_error_ratio, args.probe_url)
        elif args.command == "untag":
            print("removed tags:", " ".join(untag(gcloud, target)) or "none", file=sys.stderr)
        elif args.command == "rollback":
            rollback(gcloud, target, args.to_revision)
        else:
            status(gcloud, target)
    except DeployError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
