// What every browser script shares: its settings from the test (CUTOUT_BROWSER, one JSON object)
// and Debian's chromium launched headless, with nothing of its own going to the network.
import { chromium } from "playwright-core";

export const config = JSON.parse(process.env.CUTOUT_BROWSER);

const launchOptions = {
  executablePath: config.chromium || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
  ],
};

// A browser with its profile kept in config.userDataDir (a reload finds its cache and storage).
export function launchWithProfile(options = {}) {
  return chromium.launchPersistentContext(config.userDataDir, { ...launchOptions, ...options });
}

// A browser without a profile of its own.
export function launch() {
  return chromium.launch(launchOptions);
}
