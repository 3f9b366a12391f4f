// transformers.js (Node, onnxruntime-node on the CPU) running an output folder.
//
//   node generate.mjs FOLDER REQUEST.json
//
// REQUEST: {"dtypes": [...], "prompts": [...], "max_new_tokens": N, "min_new_tokens": M (optional),
//           "lines": [...] (optional: texts to encode and decode)}
// Prints JSON: {"generations": {dtype: [{"input_ids", "generated_ids", "seconds"}]},
//               "encoded": [[ids]...], "decoded": [text...]}
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { AutoTokenizer, AutoModelForCausalLM, env } from '@huggingface/transformers';

const [folder, requestPath] = process.argv.slice(2);
const request = JSON.parse(readFileSync(requestPath, 'utf8'));
env.allowLocalModels = true;
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(folder));
const name = path.basename(path.resolve(folder));

const tokenizer = await AutoTokenizer.from_pretrained(name);
const result = { generations: {} };
for (const dtype of request.dtypes ?? []) {
  const model = await AutoModelForCausalLM.from_pretrained(name, { dtype, device: 'cpu' });
  const cases = [];
  for (const prompt of request.prompts) {
    const inputs = tokenizer(prompt);
    const start = performance.now();
    const output = await model.generate({ ...inputs, max_new_tokens: request.max_new_tokens, min_new_tokens: request.min_new_tokens ?? 0, do_sample: false });
    const seconds = (performance.now() - start) / 1000;
    const ids = output.tolist()[0].map(Number);
    const n = inputs.input_ids.dims[1];
    cases.push({ input_ids: ids.slice(0, n), generated_ids: ids.slice(n), seconds });
  }
  result.generations[dtype] = cases;
  await model.dispose();
}
if (request.lines) {
  result.encoded = request.lines.map((line) => tokenizer.encode(line, { add_special_tokens: false }));
  result.decoded = result.encoded.map((ids) => tokenizer.decode(ids, { skip_special_tokens: false }));
}
console.log(JSON.stringify(result));
