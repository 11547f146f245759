#!/usr/bin/env bash
# System libraries Qt/napari need on a headless Debian/Ubuntu machine (and Xvfb for
# tests and screenshots).  Installs them when running as root with apt-get and they
# are missing; otherwise says what to install.  Desktop machines usually have them.
set -euo pipefail
PKGS="xvfb xauth libgl1 libegl1 libfontconfig1 libglib2.0-0 libdbus-1-3 libxkbcommon0 \
libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
libxcb-render-util0 libxcb-shape0 libxcb-xkb1"
[ "$(uname -s)" = "Linux" ] || exit 0
command -v dpkg-query >/dev/null 2>&1 || exit 0
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
  echo "note: napari on a headless machine needs:$missing"
  echo "      install them with: sudo apt-get install$missing"
fi
