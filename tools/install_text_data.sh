#!/usr/bin/env bash
# Optional everyday-English text for the synthesized corpus: WordNet's ~40k usage examples from the
# Debian package wordnet-base (/usr/share/wordnet). Best effort: without it the corpus uses news,
# Wikipedia, reviews and generated sentences only, and says so.
set -uo pipefail
[ -d /usr/share/wordnet ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base) >/dev/null 2>&1 \
    && echo "install_text_data.sh: installed wordnet-base" \
    || echo "install_text_data.sh: could not install wordnet-base; the corpus goes without WordNet examples"
else
  echo "install_text_data.sh: not root or no apt-get; for WordNet example sentences run: sudo apt-get install wordnet-base"
fi
exit 0
