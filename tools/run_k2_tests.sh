#!/usr/bin/env bash
# The k2 test lane: builds (or reuses) the Python 3.9 + torch 1.13.1 + k2 1.23.4 venv (tools/install_k2.sh --ci)
# and runs the lattice tests in it with k2 required, so the k2 backend is compared with the built-in one rather than
# skipped. The main venv runs the same tests without k2. Extra arguments go to pytest.
#
#   bash tools/run_k2_tests.sh            # MTP_ASR_K2_VENV=/path picks another venv location
set -euo pipefail
tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
top=$(dirname "$tools_dir")
venv=${MTP_ASR_K2_VENV:-$tools_dir/venv-k2}
. "$tools_dir/log.sh"

start=$SECONDS
bash "$tools_dir/install_k2.sh" --ci --venv "$venv"
cd "$top"
# --noconftest: tests/conftest.py imports packages (soundfile, numpy fixtures) this venv does not have.
MTP_ASR_REQUIRE_K2=1 PYTHONPATH="$top${PYTHONPATH:+:$PYTHONPATH}" \
  "$venv/bin/python" -m pytest -q --noconftest -p no:cacheprovider tests/test_lattice.py "$@"
log "k2 lane passed in $((SECONDS - start)) s"
