#!/usr/bin/env bash
# Optional speech synthesis engines for speechlm.data.tts, from Debian packages: Flite (flite) and
# Festival with two diphone voices (festival festvox-kallpc16k festvox-kdlpc16k); also Debian's
# pocketsphinx-testdata, whose 5 LibriVox clips are the real read speech of the zero-shot ASR check. eSpeak NG and Piper
# come from PyPI with the Python dependencies (tools/install.sh). Best effort: without these packages
# their engines report engine_available() == False, their tests skip and the corpus leaves them out.
# Never fails the caller.
set -uo pipefail
PACKAGES=(flite festival festvox-kallpc16k festvox-kdlpc16k pocketsphinx-testdata)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1; then
    echo "install_tts.sh: installed ${missing[*]}"
  else
    echo "install_tts.sh: could not install ${missing[*]}; those synthesis engines stay unavailable"
  fi
else
  echo "install_tts.sh: not root or no apt-get; for the Flite and Festival engines run: sudo apt-get install ${missing[*]}"
fi
exit 0
