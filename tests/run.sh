#!/usr/bin/env bash
# The whole test suite on a fresh machine: sets up the virtualenv, then runs pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh tests/unit -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source tests/bootstrap.sh
export TRITON_INTERPRET=1
exec python -m pytest "${@:-tests}"
