#!/usr/bin/env bash
# mypy over the package as Python imports it. The repository root *is* the package `loraplane`
# (pyproject maps it), so mypy gets a view where that is visible: .typecheck/loraplane -> repo root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p .typecheck
ln -sfn .. .typecheck/loraplane
export MYPYPATH="$ROOT/.typecheck"
exec "${MYPY:-.venv/bin/mypy}" --explicit-package-bases \
  .typecheck/loraplane/__init__.py \
  .typecheck/loraplane/common .typecheck/loraplane/registry .typecheck/loraplane/platform .typecheck/loraplane/trainer \
  .typecheck/loraplane/serving .typecheck/loraplane/evals "$@"
