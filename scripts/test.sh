#!/usr/bin/env bash
# The test command (README, .ci/run): lint, type-check, then the whole test suite, end-to-end tests
# with the real trainer and a real vLLM CPU server included. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
echo "[test] ruff" >&2
ruff check .
ruff format --check .
echo "[test] mypy" >&2
bash scripts/typecheck.sh
echo "[test] pytest" >&2
exec python -m pytest "$@"
