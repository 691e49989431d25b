// Recompute the reference o200k_base token counts in tokens/corpus.jsonl.
//
// The counts come from js-tiktoken 1.0.21 (npm), which bundles the o200k_base
// ranks, so this runs offline once the package is installed. Nothing here is
// needed at runtime by poe2openai; it only produces test data.
//
// How to run (from the repository root; keep node_modules out of the repo):
//   mkdir -p /tmp/tok && (cd /tmp/tok && npm install js-tiktoken@1.0.21)
//   NODE_PATH=/tmp/tok/node_modules node tokens/count_o200k.mjs
// or, equivalently, from the folder that has node_modules:
//   cd /tmp/tok && node /path/to/repo/tokens/count_o200k.mjs
//
// It reads every line of tokens/corpus.jsonl ({"name", "kind", "text", "o200k"}),
// sets "o200k" to the token count of "text", and rewrites the file in place.
import { createRequire } from "node:module";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

// ES module resolution ignores NODE_PATH; createRequire honours it.
const require = createRequire(join(process.cwd(), "noop.js"));
const { getEncoding } = require("js-tiktoken");

const corpus = join(dirname(fileURLToPath(import.meta.url)), "corpus.jsonl");
const enc = getEncoding("o200k_base");
const out = [];
for (const line of readFileSync(corpus, "utf8").split("\n")) {
  if (!line.trim()) continue;
  const row = JSON.parse(line);
  row.o200k = enc.encode(row.text).length;
  out.push(JSON.stringify({ name: row.name, kind: row.kind, text: row.text, o200k: row.o200k }));
}
writeFileSync(corpus, out.join("\n") + "\n");
console.log(`updated ${out.length} texts in ${corpus}`);
