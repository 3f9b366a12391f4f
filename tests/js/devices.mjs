// A symb output folder in a headless Chromium (Debian's, driven by
// playwright-core), on each of transformers.js's browser devices: WebAssembly
// and WebGPU (SwiftShader's adapter where the machine has no GPU).
//
//   node devices.mjs URL REQUEST.json OUT
//
// URL: the folder served by `symb serve --transformers-js`. REQUEST:
// {"webgpu" (start Chromium with a WebGPU adapter), "devices", "dtypes",
// "prompts", "max_new_tokens"}. Prints JSON: {"adapter" ({vendor,
// architecture} or null), "features" (the adapter's), "runs": {device:
// {dtype: {"error"} or {"seconds", "tokens_per_second", "cases": [{"ids"
// (greedy), "input_ids", "logits" (a file in OUT: the prompt's logits,
// [positions, vocab], little-endian float32)}]}}}, "console"}.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [url, requestPath, out] = process.argv.slice(2);
const request = JSON.parse(readFileSync(requestPath, 'utf8'));
const profile = mkdtempSync(path.join(tmpdir(), 'symb-chromium-'));
const gpu = request.webgpu ? ['--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader', '--use-angle=swiftshader'] : ['--disable-features=WebGPU'];
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', ...gpu],
});
const result = { console: [] };
try {
  const page = await context.newPage();
  page.on('console', (m) => result.console.push(m.text()));
  // A page of the folder without scripts of its own: same origin as the model.
  await page.goto(new URL('report.html', url).href);
  Object.assign(result, await page.evaluate(async (request) => {
    const out = { adapter: null, features: [], runs: {} };
    const adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null;
    if (adapter) {
      const info = adapter.info ?? {};
      out.adapter = { vendor: info.vendor ?? '', architecture: info.architecture ?? '' };
      out.features = [...adapter.features];
    }
    const { url, wasm } = await (await fetch('/_symb/transformers.json')).json();
    const { AutoTokenizer, AutoModelForCausalLM, env } = await import(url);
    env.allowLocalModels = true;
    env.allowRemoteModels = false;
    env.useBrowserCache = false;
    env.backends.onnx.wasm.wasmPaths = wasm;
    const tokenizer = await AutoTokenizer.from_pretrained('.');
    const base64 = (floats) => {
      const bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength);
      let text = '';
      for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
      return btoa(text);
    };
    for (const device of request.devices) {
      out.runs[device] = {};
      for (const dtype of request.dtypes) {
        let model;
        try {
          model = await AutoModelForCausalLM.from_pretrained('.', { dtype, device });
          const cases = [];
          let seconds = 0, tokens = 0;
          for (const prompt of request.prompts) {
            const inputs = tokenizer(prompt);
            const { logits } = await model(inputs);
            const start = performance.now();
            const output = await model.generate({ ...inputs, max_new_tokens: request.max_new_tokens, do_sample: false });
            seconds += (performance.now() - start) / 1000;
            const n = inputs.input_ids.dims[1];
            const ids = output.tolist()[0].map(Number).slice(n);
            tokens += ids.length;
            cases.push({ ids, input_ids: inputs.input_ids.tolist()[0].map(Number), logits: base64(new Float32Array(logits.data)) });
          }
          out.runs[device][dtype] = { seconds, tokens_per_second: tokens / seconds, cases };
        } catch (e) {
          out.runs[device][dtype] = { error: String(e?.message ?? e) };
        } finally {
          await model?.dispose();
        }
      }
    }
    return out;
  }, request));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
for (const [device, dtypes] of Object.entries(result.runs ?? {})) {
  for (const [dtype, run] of Object.entries(dtypes)) {
    (run.cases ?? []).forEach((c, i) => {
      const file = path.join(out, `${device}-${dtype}-${i}.f32`);
      writeFileSync(file, Buffer.from(c.logits, 'base64'));
      c.logits = file;
    });
  }
}
console.log(JSON.stringify(result));
