#!/usr/bin/env bash
# Optional speech synthesis engines for speechlm.data.tts, from Debian packages: Flite (flite) and
# Festival with two diphone voices (festival festvox-kallpc16k festvox-kdlpc16k); also Debian's
# pocketsphinx-testdata, whose 5 LibriVox clips are the real read speech of the zero-shot ASR check. eSpeak NG and Piper
# come from PyPI with the Python dependencies (tools/install.sh). Best effort: without these packages
# their engines report engine_available() == False, their tests skip and the corpus leaves them out.
# Never fails the caller.
set -uo pipefail
. "$(dirname "$0")/lib_apt.sh"
apt_install_missing install_tts.sh "those synthesis engines stay unavailable" "for the Flite and Festival engines " \
  flite festival festvox-kallpc16k festvox-kdlpc16k pocketsphinx-testdata
exit 0
