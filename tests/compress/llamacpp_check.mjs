// Run GGUF files through real llama.cpp (the prebuilt one inside the npm package node-llama-cpp) and print what
// it computes, as JSON, for tests/compress/test_gguf_llamacpp.py to compare against Hugging Face.
//
// Usage: node llamacpp_check.mjs <node-llama-cpp prefix> <jobs.json>
//   prefix: the folder given to `npm install --prefix` (holds node_modules/node-llama-cpp)
//   jobs.json: [{"gguf": path, "texts": [string], "ids": [int]|null, "top_k": int, "n_predict": int,
//                "context": int (default 256)}, ...]
// Output (stdout, one JSON object): {"jobs": [{"tokens": per text, its ids (special tokens parsed, none added),
//   "top": per position of `ids`, the top_k [token, probability] pairs of the next-token distribution,
//   "greedy": n_predict greedy tokens after `ids`, "error": string|null}], "log": [llama.cpp warnings]}
// Probabilities come from llama.cpp's sampler at temperature 1 with no top-k/top-p/min-p cut, i.e. the softmax
// of the logits.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [prefix, jobsPath] = process.argv.slice(2);
const jobs = JSON.parse(readFileSync(jobsPath, "utf8"));
const entry = join(prefix, "node_modules", "node-llama-cpp", "dist", "index.js");
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(entry).href);

const log = [];
// build: "never" — use the prebuilt binary or fail; a silent source build would take many minutes.
const llama = await getLlama({
  gpu: false, build: "never", progressLogs: false, logLevel: LlamaLogLevel.warn,
  logger: (level, message) => { if (String(message).trim()) log.push(`${level}: ${String(message).trim()}`); },
});

const fullDistribution = { temperature: 1, topK: 0, topP: 1, minP: 0 };

async function runJob(job) {
  const model = await llama.loadModel({ modelPath: job.gguf, gpuLayers: 0 });
  try {
    const out = { tokens: (job.texts ?? []).map((t) => Array.from(model.tokenize(t, true))), top: [], greedy: [],
      error: null };
    if (job.ids && job.ids.length) {
      const context = await model.createContext({ contextSize: job.context ?? 256, batchSize: 256, threads: 2 });
      try {
        const sequence = context.getSequence();
        const input = job.ids.map((id) => [id, { generateNext: { probabilities: true, options: fullDistribution } }]);
        const result = await sequence.controlledEvaluate(input);
        for (let i = 0; i < job.ids.length; i++) {
          const probs = result[i]?.next?.probabilities;
          out.top.push(probs ? Array.from(probs.entries()).slice(0, job.top_k ?? 5) : null);
        }
        // Greedy continuation, one token at a time (temperature 0 = argmax).
        let last = out.top.at(-1)?.[0]?.[0];
        for (let n = 0; n < (job.n_predict ?? 0) && last != null; n++) {
          out.greedy.push(last);
          if (n + 1 === job.n_predict) break;
          const step = await sequence.controlledEvaluate([[last, { generateNext: { token: true, options: { temperature: 0 } } }]]);
          last = step[0]?.next?.token ?? null;
        }
      } finally {
        await context.dispose();
      }
    }
    return out;
  } finally {
    await model.dispose();
  }
}

const results = [];
for (const job of jobs) {
  try {
    results.push(await runJob(job));
  } catch (err) {
    results.push({ tokens: [], top: [], greedy: [], error: String(err?.stack ?? err) });
  }
}
process.stdout.write(JSON.stringify({ jobs: results, log }));
await llama.dispose();
