#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the web demo's browser test (tests/test_demo_browser.py), from
# Debian's packages chromium and chromium-driver. Best effort: without them that test is skipped with
# the reason. Never fails the caller.
set -uo pipefail
PACKAGES=(chromium chromium-driver)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1; then
    echo "install_browser.sh: installed ${missing[*]}"
  else
    echo "install_browser.sh: could not install ${missing[*]}; the browser test will be skipped"
  fi
else
  echo "install_browser.sh: not root or no apt-get; for the browser test run: sudo apt-get install ${missing[*]}"
fi
exit 0
