# Sourced by tools/install_tts.sh and tools/install_browser.sh: best-effort apt-get install of the Debian
# packages that are missing. Never fails the caller.
#
#   apt_install_missing NAME ON_FAIL FOR_WHAT PACKAGE...
#     NAME      the calling script's name, the prefix of every message
#     ON_FAIL   what follows "could not install <packages>; " when apt-get fails
#     FOR_WHAT  what follows "not root or no apt-get; " before "run: sudo apt-get install <packages>"
# Prints nothing when every package is installed.
apt_install_missing() {
  local name=$1 on_fail=$2 for_what=$3
  shift 3
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1
    then
      echo "$name: installed ${missing[*]}"
    else
      echo "$name: could not install ${missing[*]}; $on_fail"
    fi
  else
    echo "$name: not root or no apt-get; ${for_what}run: sudo apt-get install ${missing[*]}"
  fi
  return 0
}
