#!/usr/bin/env bash
# Install the Debian packages formers' offline data sources read (see docs/data.md), the headless browser the catalog test
# drives, and the C++ compiler and Python headers torch.compile (train.compile) builds CPU kernels with, when run as root.
# Not root: print one line naming what is missing and how to install it, and carry on.
set -u
PKGS="dataset-fashion-mnist espeak-ng sox bible-kjv fortunes fortunes-min linux-doc-6.1 chromium chromium-driver g++ python3-dev"
command -v dpkg-query >/dev/null 2>&1 || { echo "setup: not a Debian system; skipping Debian data packages ($PKGS)"; exit 0; }
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = "0" ]; then
  echo "setup: installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null \
    || { echo "setup: apt-get install failed for:$missing"; exit 1; }
else
  echo "setup: missing Debian packages (optional data sources):$missing; install with: sudo apt-get install -y --no-install-recommends$missing"
fi
