#!/usr/bin/env bash
# Creates (or updates) the project's environment: Debian packages for the demo corpus, a venv under tools/venv
# with mtp_asr installed editable plus its dev (tests) and demo (a neural TTS voice) extras. Safe to run again: finished steps are skipped.
#
#   bash tools/install.sh            # everything
#   MTP_ASR_VENV=/path bash tools/install.sh   # another venv location
set -euo pipefail
tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
top=$(dirname "$tools_dir")
venv=${MTP_ASR_VENV:-$tools_dir/venv}
python=${PYTHON:-python3}
. "$tools_dir/log.sh"

# Debian packages: TTS engines, sox and the text sources of the demo corpus, ffmpeg for compressed audio.
debs="espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox libsox-fmt-all
wordnet-base fortunes fortunes-min ffmpeg"
missing=$(for p in $debs; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing Debian packages: $(echo $missing)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q $missing >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null; }
  else
    log "not root: install the demo corpus' Debian packages with"
    echo "  sudo apt-get install -y $(echo $missing)"
  fi
fi

# The venv. The stamp holds a hash of setup.cfg, so a changed dependency list reinstalls.
stamp=$venv/.mtp_asr_installed
want=$(cat "$top/setup.cfg" "$top/pyproject.toml" | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "environment $venv is up to date"
  exit 0
fi
[ -x "$venv/bin/python" ] || { log "creating venv $venv"; "$python" -m venv "$venv"; }
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
log "installing torch and torchaudio (a few minutes the first time, 6 GB; $(free_disk "$venv") free)"
# torch first: with a capped pip this takes the release on the machine's disk instead of a download.
$pip install 'torch>=2.4' 'torchaudio>=2.4'
log "installing mtp_asr (editable) with the dev and demo extras"
$pip install -e "$top[dev,demo]"
echo "$want" > "$stamp"
"$venv/bin/python" -c "import torch, torchaudio, lhotse, sentencepiece, kaldialign; print('torch', torch.__version__, 'torchaudio', torchaudio.__version__, 'lhotse', lhotse.__version__)"
log "done: activate with '. $venv/bin/activate'"
