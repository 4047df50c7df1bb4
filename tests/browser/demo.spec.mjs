// Drives Debian's chromium through the storefront demo page, twice, and reports what went over the wire.
//
//   CUTOUT_BROWSER='{"pageUrl": ..., "photo": ..., "userDataDir": ..., "screenshotDir": ...}' node demo.spec.mjs
//
// Visit 1: the page wakes the service, the photo is picked, hash-first misses, the photo is uploaded
// (the test answers the first upload with 429 + Retry-After, so it is retried), the previews load.
// Visit 2 (a reload, same photo): hash-first hits, nothing is uploaded, the previews load.
// It prints one JSON document on stdout; the pytest test makes the assertions.
import path from "node:path";

import { config, launchWithProfile } from "./chromium.mjs";

function classify(request) {
  const url = new URL(request.url());
  if (request.method() === "GET" && url.pathname === "/health") return "wake";
  if (request.method() !== "POST" || url.pathname !== "/v1/process") return null;
  const body = request.postDataBuffer()?.toString("latin1") ?? "";
  const hash = /name="image_sha256"\r\n\r\n([0-9a-f]{64})/.exec(body);
  if (hash) return "hash-first:" + hash[1];
  // Chromium does not hand the file part of a multipart body to the driver, so anything but a
  // hash-first request is the upload; the proxy in front of the service checks its body.
  return "upload";
}

async function visit(page, label, log, consoleLines) {
  const started = Date.now();
  const entries = [];
  const onRequest = (request) => {
    const kind = classify(request);
    if (kind) entries.push({ kind, request, sentAt: Date.now() - started, status: null });
  };
  const onFinished = async (request) => {
    const entry = entries.find((e) => e.request === request);
    if (!entry) return;
    const response = await request.response();
    entry.status = response ? response.status() : null;
    entry.doneAt = Date.now() - started;
  };
  const onFailed = (request) => {
    const entry = entries.find((e) => e.request === request);
    if (entry) entry.failure = request.failure()?.errorText ?? "failed";
  };
  page.on("request", onRequest);
  page.on("requestfinished", onFinished);
  page.on("requestfailed", onFailed);

  const wokeBeforePick = page.waitForRequest((r) => new URL(r.url()).pathname === "/health", { timeout: 30000 });
  if (label === "first") await page.goto(config.pageUrl);
  else await page.reload();
  await wokeBeforePick;
  const pickedAt = Date.now() - started;
  await page.setInputFiles("#photo", config.photo);
  await page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null, {
    timeout: 180000,
  });
  // Let the last request's "finished" event land.
  await page.waitForTimeout(200);

  const state = await page.evaluate(() => ({
    state: document.body.dataset.state,
    error: document.body.dataset.error || null,
    status: document.getElementById("status").textContent,
    sha256: document.body.dataset.sha256 || null,
    uploaded: document.body.dataset.uploaded || null,
    stages: (document.body.dataset.stages || "").split(","),
    previews: [...document.querySelectorAll("#previews figure")].map((figure) => {
      const img = figure.querySelector("img");
      return {
        effect: figure.dataset.effect,
        label: figure.querySelector("figcaption").textContent,
        src: img.currentSrc || img.src,
        naturalWidth: img.naturalWidth,
        naturalHeight: img.naturalHeight,
        complete: img.complete,
      };
    }),
  }));
  const screenshot = path.join(config.screenshotDir, `demo-${label}-visit.png`);
  await page.screenshot({ path: screenshot, fullPage: true });

  page.off("request", onRequest);
  page.off("requestfinished", onFinished);
  page.off("requestfailed", onFailed);
  log[label] = {
    pickedAt,
    screenshot,
    ...state,
    requests: entries.map(({ kind, sentAt, doneAt, status, failure }) => ({ kind, sentAt, doneAt, status, failure })),
    console: consoleLines.splice(0),
  };
}

const context = await launchWithProfile({ viewport: { width: 1100, height: 900 } });
const result = { chromium: context.browser()?.version() ?? null };
try {
  const page = context.pages()[0] ?? (await context.newPage());
  const consoleLines = [];
  page.on("console", (message) => consoleLines.push(`${message.type()}: ${message.text()}`));
  page.on("pageerror", (error) => consoleLines.push(`pageerror: ${error.message}`));
  await visit(page, "first", result, consoleLines);
  await visit(page, "second", result, consoleLines);
  // Retry-After comes as delta-seconds or as an HTTP date; anything else falls back to backoff.
  result.retryAfter = await page.evaluate(() => {
    const now = Date.parse("Wed, 21 Oct 2026 07:28:00 GMT");
    return {
      seconds: Cutout.parseRetryAfter("2"),
      date: Cutout.parseRetryAfter("Wed, 21 Oct 2026 07:28:05 GMT", now),
      past: Cutout.parseRetryAfter("Wed, 21 Oct 2026 07:27:00 GMT", now),
      garbage: String(Cutout.parseRetryAfter("soon")),
    };
  });
} finally {
  await context.close();
}
process.stdout.write(JSON.stringify(result) + "\n");
