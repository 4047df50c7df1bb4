// Runs the production theme's calls to its background-removal host (theme-callers.js) in Debian's
// chromium, from a page on another origin, and reports what each caller got back.
//
//   CUTOUT_BROWSER='{"pageUrl": ..., "strangerUrl": ..., "photos": {...}, "mode": "ready"|"cold", ...}' node theme.spec.mjs
//
// mode "ready": every caller against a service with the cutout model; then one caller from an
// origin the service does not allow. mode "cold": the callers against a service without the
// model, to see the theme's own error path (a readable 503, not a CORS failure).
// It prints one JSON document on stdout; the pytest test makes the assertions.
import { config, launchWithProfile } from "./chromium.mjs";

const context = await launchWithProfile();
const result = { chromium: context.browser()?.version() ?? null, console: [], responses: [] };

async function open(url) {
  const page = await context.newPage();
  page.on("console", (message) => result.console.push(`${message.type()}: ${message.text()}`));
  page.on("pageerror", (error) => result.console.push(`pageerror: ${error.message}`));
  page.on("response", (response) => {
    const request = response.request();
    if (new URL(request.url()).origin !== new URL(url).origin) {
      result.responses.push({ method: request.method(), url: request.url(), status: response.status() });
    }
  });
  await page.goto(url);
  await page.setInputFiles("#large", config.photos.large);
  await page.setInputFiles("#small", config.photos.small);
  await page.setInputFiles("#png", config.photos.png);
  return page;
}

// Each caller runs in the page; failures are caught there and reported as `error`.
async function run(page, body) {
  return page.evaluate(`(async () => {
    const T = window.ThemeCallers;
    const file = (id) => document.getElementById(id).files[0];
    try { return await (async () => { ${body} })(); }
    catch (error) { return { error: String(error && error.message || error), name: error && error.name }; }
  })()`);
}

try {
  const page = await open(config.pageUrl);
  if (config.mode === "ready") {
    result.petProcessor = await run(
      page,
      `const out = await T.petProcessorCallAPI(file("large"));
       const shown = {};
       for (const [name, url] of Object.entries(out.dataUrls)) {
         shown[name] = { ...(await T.show(url)), transparency: await T.transparency(url), prefix: url.slice(0, 22) };
       }
       // Then the pictures kept for fulfilment, as callAPI does in the background.
       const kept = {};
       for (const [name, url] of Object.entries(out.dataUrls)) {
         kept[name] = await T.petProcessorUploadToGCS(url, "pet_1", "processed", name, "Rex");
       }
       kept.original = await T.petProcessorUploadOriginal(file("large"), "pet_1");
       for (const entry of Object.values(kept)) if (entry.url) entry.shown = await T.show(entry.url);
       return { sent: out.sent, keys: Object.keys(out.dataUrls), shown, gemini: await T.show(out.geminiInput), kept };`,
    );
    result.resegment = await run(
      page,
      `const out = await T.petProcessorResegment("/gemini.png");
       if (!out.success) return out;
       return { success: true, prefix: out.dataUrl.slice(0, 23), shown: await T.show(out.dataUrl),
                transparency: await T.transparency(out.dataUrl) };`,
    );
    result.inlinePreview = await run(
      page,
      `const effects = await T.inlinePreviewRemoveBackground(file("small"));
       const shown = {};
       for (const [name, url] of Object.entries(effects)) shown[name] = await T.show(url);
       const kept = {
         color: await T.inlinePreviewUploadEffect(effects.color, "inline_1", "color"),
         original: await T.inlinePreviewUploadOriginal(file("small"), "inline_1"),
       };
       for (const entry of Object.values(kept)) if (entry.url) entry.shown = await T.show(entry.url);
       return { keys: Object.keys(effects), shown, kept };`,
    );
    for (const [label, useBirefnet] of [["apiClientBirefnet", true], ["apiClientInspyrenet", false]]) {
      result[label] = await run(
        page,
        `const client = new T.APIClient(${useBirefnet});
         const returned = await client.removeBackground(file("png"));
         const shown = {};
         for (const [name, url] of Object.entries(client.effectUrls)) shown[name] = await T.show(url);
         return { returnedIsColor: returned === client.effectUrls.color, returned: await T.show(returned),
                  keys: Object.keys(client.effectUrls), shown };`,
      );
    }
    result.stitch = await run(
      page,
      `const out = await T.stitchUploadToServer(file("png"), "stitch_1");
       if (out.url) out.shown = await T.show(out.url);
       return out;`,
    );
    result.apiClientWarmup = await run(page, `return { modelReady: await new T.APIClient(true).warmup() };`);
    await page.close();

    // The same caller from an origin the service does not list: the browser must refuse the answer.
    const stranger = await open(config.strangerUrl);
    result.stranger = await run(stranger, `return await T.inlinePreviewRemoveBackground(file("small"));`);
    await stranger.close();
  } else {
    result.petProcessor = await run(page, `return await T.petProcessorCallAPI(file("large"));`);
    result.inlinePreview = await run(page, `return await T.inlinePreviewRemoveBackground(file("small"));`);
    result.resegment = await run(page, `return await T.petProcessorResegment("/gemini.png");`);
    await page.close();
  }
} finally {
  await context.close();
}
process.stdout.write(JSON.stringify(result) + "\n");
