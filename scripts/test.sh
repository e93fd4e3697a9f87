#!/usr/bin/env bash
# Set up (scripts/setup.sh test) and run the full test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
status=0
"${BLOCKOPT_VENV:-.venv}/bin/python" -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
fi
exit "$status"
