#!/usr/bin/env bash
# Installs k2, the optional lattice backend (mtp_asr/decode/lattice_k2.py). Two modes:
#
#   bash tools/install_k2.sh --ci [--venv DIR]
#       CI: builds a second venv (default tools/venv-k2) with pyenv's Python 3.9 and the one k2 release on PyPI,
#       k2 1.23.4 (Python 3.9 + torch 1.13.1 only), plus numpy<2, pytest and kaldialign. The main venv stays on
#       current torch without k2. Safe to run again: a stamp file records what was installed.
#
#   bash tools/install_k2.sh [--dry-run] [--python PYTHON] [--cpu] [--index URL]
#       Users: finds the newest k2 wheel built for the torch release, CUDA version, Python and platform of PYTHON
#       (default: python3, e.g. your activated venv) on k2-fsa's wheel index -- https://k2-fsa.github.io/k2/cuda.html
#       for a CUDA torch, https://k2-fsa.github.io/k2/cpu.html for a CPU one or with --cpu -- and pip-installs it.
#       --dry-run prints the pip command instead. --index reads another copy of the index page (a mirror, a file).
set -euo pipefail
tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
. "$tools_dir/log.sh"

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

mode=user dry_run=false python=python3 force_cpu=false index= venv=$tools_dir/venv-k2
while [ $# -gt 0 ]; do
  case $1 in
    --ci) mode=ci ;;
    --venv) venv=$2; shift ;;
    --dry-run) dry_run=true ;;
    --python) python=$2; shift ;;
    --cpu) force_cpu=true ;;
    --index) index=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install_k2.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

ci_install() {
  # Pins: the only k2 on PyPI is 1.23.4, built against torch 1.13.1 for CPython 3.9; numpy 2 breaks torch 1.13.
  local pins="torch==1.13.1 numpy<2 k2==1.23.4 pytest kaldialign"
  local stamp=$venv/.k2_installed
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ] && "$venv/bin/python" -c "import k2" 2>/dev/null; then
    log "k2 environment $venv is up to date"
    return
  fi
  local py39=
  if command -v pyenv >/dev/null; then
    local v
    v=$(ls "$(pyenv root)/versions" 2>/dev/null | grep -E '^3\.9\.[0-9]+$' | sort -V | tail -n 1 || true)
    [ -n "$v" ] && py39=$(pyenv root)/versions/$v/bin/python
  fi
  [ -z "$py39" ] && command -v python3.9 >/dev/null && py39=$(command -v python3.9)
  if [ -z "$py39" ]; then
    echo "install_k2.sh: k2 1.23.4 needs Python 3.9; found neither a 3.9 under pyenv's versions nor python3.9 on PATH" >&2
    exit 1
  fi
  [ -x "$venv/bin/python" ] || { log "creating venv $venv with $py39"; "$py39" -m venv "$venv"; }
  log "installing $pins into $venv (a minute or two the first time, 3.5 GB; $(free_disk "$venv") free)"
  # torch first, so that k2's own torch requirement is already met by the pinned release.
  "$venv/bin/python" -m pip --disable-pip-version-check -q install torch==1.13.1 'numpy<2'
  "$venv/bin/python" -m pip --disable-pip-version-check -q install k2==1.23.4 pytest kaldialign
  "$venv/bin/python" -c "from k2.version import __version__ as k2; import torch; print('k2', k2, 'torch', torch.__version__)"
  echo "$pins" > "$stamp"
}

# Prints "<pip requirement> <index URL>" for the newest matching wheel on the index, or exits with the reason.
find_wheel() {
  "$python" - "$force_cpu" "$index" <<'PY'
import platform, re, sys, urllib.parse, urllib.request

force_cpu, index = sys.argv[1] == "true", sys.argv[2]
try:
    import torch
except ImportError:
    sys.exit(f"install_k2.sh: {sys.executable} cannot import torch; install torch first (k2 wheels are built per "
             "torch release)")
torch_version = torch.__version__.split("+")[0]
device = "cpu" if force_cpu or not torch.version.cuda else "cuda" + torch.version.cuda
index = index or "https://k2-fsa.github.io/k2/%s.html" % ("cpu" if device == "cpu" else "cuda")
pytag = "cp%d%d" % sys.version_info[:2]
system, machine = platform.system(), platform.machine().lower()
platforms = {"Linux": r"linux[\w.]*_%s", "Darwin": r"macosx[\w.]*_(?:%s|universal2)", "Windows": r"win_%s"}
if system not in platforms:
    sys.exit(f"install_k2.sh: k2-fsa publishes no wheels for {system}")
print(f"looking for k2 built for torch {torch_version} ({device}), {pytag}, {system} {machine} on {index}",
      file=sys.stderr)
try:
    page = urllib.parse.unquote(urllib.request.urlopen(index, timeout=30).read().decode())
except (OSError, ValueError) as e:
    sys.exit(f"install_k2.sh: cannot read {index} ({e}). Without k2-fsa's index, the PyPI release k2 1.23.4 "
             "works only with Python 3.9 + torch 1.13.1: `bash tools/install_k2.sh --ci` builds such a venv")
# k2-<version>+<device>.torch<X.Y.Z>-<pytag>-<pytag>-<platform>.whl, e.g.
# k2-1.24.4.dev20241029+cpu.torch2.5.0-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
wheel = re.compile(r"k2-(\d[\w.]*)\+%s\.torch%s-%s-%s-[\w.]*?%s[\w.]*\.whl" % (
    re.escape(device), re.escape(torch_version), pytag, pytag, platforms[system] % re.escape(machine)))
versions = {m.group(1) for m in wheel.finditer(page)}
if not versions:
    sys.exit(f"install_k2.sh: {index} lists no k2 wheel for torch {torch_version} ({device}), {pytag}, {system} "
             f"{machine}; choose a torch release it lists, or build k2 from source "
             "(https://k2-fsa.github.io/k2/installation/from_source.html)")
newest = max(versions, key=lambda v: [int(x) for x in re.findall(r"\d+", v)])
print(f"k2=={newest}+{device}.torch{torch_version}", index)
PY
}

user_install() {
  local found spec url
  found=$(find_wheel) || exit 1
  read -r spec url <<< "$found"
  local cmd=("$python" -m pip install "$spec" -f "$url")
  if $dry_run; then
    echo "${cmd[*]}"
  else
    log "running: ${cmd[*]}"
    "${cmd[@]}"
    "$python" -c "from k2.version import __version__; print('k2', __version__, 'installed')"
  fi
}

if [ $mode = ci ]; then ci_install; else user_install; fi
