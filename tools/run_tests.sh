#!/usr/bin/env bash
# The test suite: installs the environment if needed, then runs pytest (fast and slow tests) in it.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m "not slow" -x`.
set -euo pipefail
tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
bash "$tools_dir/install.sh"
cd "$(dirname "$tools_dir")"
exec "${MTP_ASR_VENV:-$tools_dir/venv}/bin/python" -m pytest -q "$@"
