// A headless Chromium (Debian's, driven by playwright-core) on the playground
// page that `symb serve` serves: types a prompt, picks a dtype, generates.
//
//   node browser.mjs URL REQUEST.json SCREENSHOT.png
//
// REQUEST: {"prompt", "dtype" (optional: else the page's choice for its
// device), "max_new_tokens", "runs" (optional), "webgpu" (optional: Chromium
// with SwiftShader's WebGPU adapter)}. Prints JSON: {"state", "device" (the
// one the page used), "dtype",
// "status", "ids", "output" (the text shown), "streamed" (how many pieces
// the streamer delivered while generating), "examples" (the example
// prompts), "requests" (every URL the page asked for), "crossOriginIsolated",
// "console", "phoneWidth" ({playground, report}: the content's width at 390
// px), "report" (report.html's text)}. Screenshots: SCREENSHOT, and beside it
// -phone, -report and -report-phone.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [url, requestPath, screenshot] = process.argv.slice(2);
const request = JSON.parse(readFileSync(requestPath, 'utf8'));
const profile = mkdtempSync(path.join(tmpdir(), 'symb-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run',
    ...(request.webgpu ? ['--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader', '--use-angle=swiftshader'] : ['--disable-gpu', '--disable-features=WebGPU']),
  ],
});
const result = { requests: [], console: [] };
try {
  const page = await context.newPage();
  page.on('request', (r) => result.requests.push(r.url()));
  page.on('console', (m) => result.console.push(m.text()));
  await page.goto(url);
  const settled = (states) => page.waitForFunction((s) => s.includes(document.body.dataset.state), states, { timeout: 300_000 });
  await settled(['ready', 'error']);
  if ((await page.evaluate(() => document.body.dataset.state)) === 'ready') {
    await page.fill('#prompt', request.prompt);
    if (request.dtype) await page.selectOption('#dtype', request.dtype);
    await page.fill('#max', String(request.max_new_tokens));
    // `runs` > 1: the same generation again (the first one warms ONNX Runtime up).
    for (let run = 0; run < (request.runs ?? 1); run++) {
      await page.evaluate(() => { document.body.dataset.state = 'ready'; });
      await page.click('#run');
      await settled(['done', 'error']);
    }
  }
  result.state = await page.evaluate(() => document.body.dataset.state);
  result.device = await page.evaluate(() => document.body.dataset.device);
  result.dtype = await page.inputValue('#dtype');
  result.status = await page.textContent('#status');
  const ids = await page.textContent('#ids');
  result.ids = ids ? JSON.parse(ids) : null;
  result.crossOriginIsolated = await page.evaluate(() => crossOriginIsolated);
  result.output = await page.textContent('#output');
  result.streamed = Number(await page.getAttribute('#output', 'data-streamed'));
  result.examples = await page.$$eval('#examples button', (b) => b.map((x) => x.textContent));
  await page.screenshot({ path: screenshot, fullPage: true });
  // Both pages at a phone's width (390 px): screenshots, and how wide the
  // content is (more than the screen means sideways scrolling).
  const width = () => document.documentElement.scrollWidth;
  await page.setViewportSize({ width: 390, height: 844 });
  result.phoneWidth = { playground: await page.evaluate(width) };
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-phone.png'), fullPage: true });
  await page.goto(new URL('report.html', url).href);
  result.phoneWidth.report = await page.evaluate(width);
  result.report = await page.textContent('body');
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-report-phone.png'), fullPage: true });
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-report.png'), fullPage: true });
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
