// symb's tokenizer check (`verify.tokenizer`): transformers.js, the build a
// page loads, tokenizes lines in Node exactly as a page's
// `AutoTokenizer.from_pretrained('.')` would, reading the output folder's
// files through `fetch`.
//   node tokenize.mjs LIBRARY FOLDER LINES_JSON
// Prints {"ids": [[...] per line, no special tokens added]} or {"error"}.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [library, folder, linesPath] = process.argv.slice(2);
let out;
try {
  // The page fetches './tokenizer.json' and so on beside it: so does this.
  globalThis.fetch = async (url) => {
    const name = path.basename(new URL(String(url), 'http://page/').pathname);
    try {
      return new Response(readFileSync(path.join(folder, name)), { status: 200 });
    } catch {
      return new Response('not found', { status: 404 });
    }
  };
  const { AutoTokenizer, env } = await import(pathToFileURL(library).href);
  env.allowLocalModels = true;
  env.allowRemoteModels = false;
  env.useBrowserCache = false;
  env.useFSCache = false;
  const tokenizer = await AutoTokenizer.from_pretrained('.');
  const lines = JSON.parse(readFileSync(linesPath, 'utf8'));
  out = { ids: lines.map((line) => tokenizer.encode(line, { add_special_tokens: false })) };
} catch (e) {
  out = { error: String(e?.message ?? e) };
}
process.stdout.write(JSON.stringify(out));
