// transformers.js (Node, onnxruntime-node on the CPU) chatting with an output
// folder through its chat template, as a user's code would.
//
//   node chat.mjs FOLDER MESSAGES.json [DTYPE] [MAX_NEW_TOKENS]
//
// MESSAGES: [{"role", "content"}...]. DTYPE: else the one config.json's
// transformers.js_config names. MAX_NEW_TOKENS: 32 unless given.
// Prints JSON: {"template_ids" (apply_chat_template's ids, with the
// generation prompt), "text" (the same, rendered), "reply_ids" (the tokens
// the text-generation pipeline generated greedily from the messages, as its
// streamer received them: the pipeline returns only text), "reply" (the
// pipeline's reply text), "stopped_at_eos" (the last reply id is one of
// "eos_token_id": generation_config.json's, else config.json's, as a list)}.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { pipeline, TextStreamer, env } from '@huggingface/transformers';

const [folder, messagesPath, dtypeArg, maxArg] = process.argv.slice(2);
const messages = JSON.parse(readFileSync(messagesPath, 'utf8'));
env.allowLocalModels = true;
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(folder));
const name = path.basename(path.resolve(folder));

const generator = await pipeline('text-generation', name, { dtype: dtypeArg || undefined, device: 'cpu' });
const { tokenizer, model } = generator;
const template_ids = tokenizer.apply_chat_template(messages, {
  add_generation_prompt: true,
  tokenize: true,
  // Else a {input_ids, attention_mask} of Tensors (unlike Python's list).
  return_dict: false,
  return_tensor: false,
});
const text = tokenizer.apply_chat_template(messages, { add_generation_prompt: true, tokenize: false });
// The end of a turn: passed explicitly, as the page does.
const eos_token_id = [model.generation_config?.eos_token_id ?? model.config.eos_token_id]
  .flat()
  .filter((id) => id != null);
// The ids as generate() hands them over: first the prompt, then each new token.
const received = [];
const streamer = new TextStreamer(tokenizer, {
  // Without a callback TextStreamer writes the text to stdout.
  callback_function: () => {},
  token_callback_function: (ids) => received.push(ids.map(Number)),
});
const [output] = await generator(messages, {
  max_new_tokens: Number(maxArg ?? 32),
  do_sample: false,
  eos_token_id,
  streamer,
});
const [prompt_ids, ...steps] = received;
if (JSON.stringify(prompt_ids) !== JSON.stringify(template_ids)) {
  throw new Error(`the pipeline's prompt ${JSON.stringify(prompt_ids)} is not apply_chat_template's ${JSON.stringify(template_ids)}`);
}
const reply_ids = steps.flat();
console.log(
  JSON.stringify({
    template_ids,
    text,
    reply_ids,
    reply: output.generated_text.at(-1).content,
    stopped_at_eos: eos_token_id.includes(reply_ids.at(-1)),
    eos_token_id,
  }),
);
