#!/usr/bin/env bash
# Debian packages the ASR corpus builder needs on the GPU machine (it has no apt and reaches no registry).
#
# Here (a Debian machine with apt): download the .debs into .debs/ at the repository root (git-ignored):
#   bash studies/gpu_debs.sh [extra-package ...]        # e.g. espeak-ng libespeak-ng1 espeak-ng-data
# There (the .debs/ folder carried along): unpack them into /tmp/debroot and set PATH, LD_LIBRARY_PATH and
# UNSINK_DEB_ROOT (where data/avsr/asr_corpus.py finds the fortunes and Devil's Dictionary text):
#   source studies/gpu_debs.sh --unpack && flite -voice slt -t "hello" -o /tmp/hello.wav
#
# flite + libflite1 (voices slt, rms, awb, kal16; libasound2 is libflite1's one dependency), fortunes +
# fortunes-min + dict-devil (sentences), dict-gcide (train_sources=[gcide]: about 244,000 more training sentences;
# 14.8 MB). About 29 MB. No sox: the builder resamples in Python.
# Built for Debian 12 (glibc 2.36); binaries run on newer glibc (Ubuntu 24.04 has 2.39).
_unsink_debs_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ "${1:-}" = "--unpack" ]; then  # sourced on the GPU machine: no `set -e`, it would stay in the caller
  _dest=${UNSINK_DEB_ROOT:-/tmp/debroot}
  mkdir -p "$_dest"
  for _deb in "$_unsink_debs_root"/.debs/*.deb; do dpkg -x "$_deb" "$_dest"; done
  export UNSINK_DEB_ROOT=$_dest
  export PATH="$_dest/usr/bin:$_dest/usr/games:$PATH"
  export LD_LIBRARY_PATH="$_dest/usr/lib/x86_64-linux-gnu:$_dest/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export ESPEAK_DATA_PATH="$_dest/usr/lib/x86_64-linux-gnu/espeak-ng-data"  # used only if espeak-ng was sent
  echo "gpu_debs: unpacked $(ls "$_unsink_debs_root"/.debs/*.deb | wc -l) packages into $_dest ($(command -v flite))"
  unset _dest _deb _unsink_debs_root
  return 0 2>/dev/null || exit 0
fi

set -euo pipefail
cd "$_unsink_debs_root"
exclude=$(git rev-parse --git-common-dir)/info/exclude
grep -qx '/.debs/' "$exclude" 2>/dev/null || echo '/.debs/' >> "$exclude"
mkdir -p .debs
packages=(flite libflite1 libasound2 libasound2-data fortunes fortunes-min dict-devil dict-gcide "$@")
(cd .debs && apt-get download "${packages[@]}")
du -sh .debs
ls .debs
