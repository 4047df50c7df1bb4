// Opens the store-image callers' page in Debian's chromium and prints its report as one JSON line.
//
//   CUTOUT_BROWSER='{"pageUrl": ..., "chromium": ...}' node store_image.spec.mjs
import { config, launch } from "./chromium.mjs";

const browser = await launch();
try {
  const page = await browser.newPage();
  const consoleLines = [];
  page.on("console", (message) => consoleLines.push(`${message.type()}: ${message.text()}`));
  page.on("pageerror", (error) => consoleLines.push(`pageerror: ${error.message}`));
  await page.goto(config.pageUrl);
  await page.waitForFunction(() => window.__report !== undefined, null, { timeout: 120000 });
  const report = await page.evaluate(() => window.__report);
  report.console = consoleLines;
  console.log(JSON.stringify(report));
} finally {
  await browser.close();
}
