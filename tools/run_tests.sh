#!/usr/bin/env bash
# The test suite, in both lanes:
#   1. the main environment (tools/venv, installed first if needed): pytest over tests/ (fast and slow tests);
#   2. the k2 lane (tools/run_k2_tests.sh): the lattice tests again in a Python 3.9 + torch 1.13.1 + k2 venv, where
#      the k2 backend must agree with the built-in one.
# Extra arguments go to the main lane's pytest, e.g. `bash tools/run_tests.sh -m "not slow" -x`.
# MTP_ASR_SKIP_K2=1 skips the k2 lane (it downloads about 3.5 GB the first time).
set -euo pipefail
tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
bash "$tools_dir/install.sh"
cd "$(dirname "$tools_dir")"
"${MTP_ASR_VENV:-$tools_dir/venv}/bin/python" -m pytest -q "$@"
if [ "${MTP_ASR_SKIP_K2:-0}" != 1 ]; then
  bash "$tools_dir/run_k2_tests.sh"
fi
