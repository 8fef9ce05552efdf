#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the web demo's browser test (tests/test_demo_browser.py), from
# Debian's packages chromium and chromium-driver. Best effort: without them that test is skipped with
# the reason. Never fails the caller.
set -uo pipefail
. "$(dirname "$0")/lib_apt.sh"
apt_install_missing install_browser.sh "the browser test will be skipped" "for the browser test " \
  chromium chromium-driver
exit 0
