// A headless Chromium (Debian's, driven by playwright-core) on the playground
// page that `symb serve` serves: types a prompt, picks a dtype, generates.
//
//   node browser.mjs URL REQUEST.json SCREENSHOT.png
//
// REQUEST: {"prompt", "dtype" (optional: else the page's choice for its
// device), "max_new_tokens", "runs" (optional), "webgpu" (optional: Chromium
// with SwiftShader's WebGPU adapter), "chat" (optional: the user's messages,
// one string or a list, for a page in chat mode; else the prompt), "system"
// (optional: the chat's system prompt)}. Prints JSON: {"state", "mode"
// ("chat" where the folder's tokenizer has a chat template, else "text"),
// "device" (the one the page used), "dtype",
// "status", "ids", "output" (the text shown), "streamed" (how many pieces
// the streamer delivered while generating), "examples" (the example
// prompts), "chat" (in chat mode, a turn per message: {"message", "reply"
// (the assistant bubble's text), "done" (its data-done), "eos" (whether it
// ended at the end-of-turn token), "streamed", "seconds" (from the click on
// Send to the finished reply), "ids" (the reply's tokens)}), "requests"
// (every URL the page asked for), "crossOriginIsolated",
// "console", "speed" ({ttft, rate}: seconds to the first token, tokens/s
// after it), "hiddenColumns" ({phone, desktop}: how many pixels of the
// report's widest table scroll out of sight at 390 and 1280 px),
// "phoneWidth" ({playground, report}: the content's width at 390
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
  result.mode = await page.evaluate(() => document.body.dataset.mode);
  const ready = (await page.evaluate(() => document.body.dataset.state)) === 'ready';
  if (ready) {
    if (request.dtype) await page.selectOption('#dtype', request.dtype);
    await page.fill('#max', String(request.max_new_tokens));
  }
  if (ready && result.mode === 'chat') {
    // A chat: each message sent in turn, each reply awaited in its bubble.
    result.chat = [];
    if (request.system) await page.fill('#system', request.system);
    for (const message of [request.chat ?? request.prompt].flat()) {
      const turn = result.chat.length + 1;
      await page.fill('#message', message);
      const start = performance.now();
      await page.click('#send');
      await page.waitForFunction(
        (n) => document.querySelectorAll('.bubble.assistant[data-done="true"]').length >= n || document.body.dataset.state === 'error',
        turn,
        { timeout: 300_000 },
      );
      const seconds = (performance.now() - start) / 1000;
      if ((await page.evaluate(() => document.body.dataset.state)) === 'error') break;
      const bubble = page.locator('.bubble.assistant').nth(turn - 1);
      const ids = await page.textContent('#ids');
      result.chat.push({
        message,
        reply: await bubble.textContent(),
        done: (await bubble.getAttribute('data-done')) === 'true',
        eos: (await bubble.getAttribute('data-eos')) === 'true',
        streamed: Number(await bubble.getAttribute('data-streamed')),
        seconds,
        ids: ids ? JSON.parse(ids) : null,
      });
    }
  } else if (ready) {
    await page.fill('#prompt', request.prompt);
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
  // Seconds to the first token, and tokens/s after it.
  result.speed = await page.evaluate(() => ({ ttft: Number(document.body.dataset.ttft), rate: Number(document.body.dataset.rate) }));
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
  // Columns that scroll out of sight: how much wider each table is than
  // what shows of it (0: every column in view).
  const hidden = () =>
    Math.max(0, ...[...document.querySelectorAll('.scroll')].map((s) => s.scrollWidth - s.clientWidth));
  result.hiddenColumns = { phone: await page.evaluate(hidden) };
  await page.setViewportSize({ width: 1280, height: 900 });
  result.hiddenColumns.desktop = await page.evaluate(hidden);
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-report.png'), fullPage: true });
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
