#!/usr/bin/env bash
# Take a screenshot of a Distillery report.html in headless Chromium, to see that the page
# renders with its embedded plots (it must: report.html references no external file).
#
#   scripts/screenshot_report.sh runs/kd-cnn8/report.html [out.png]
#
# Chromium is Debian's `chromium` package. It is optional: as root this script installs it
# when it is missing (set NO_INSTALL=1 to skip); otherwise it says how to get it.
set -euo pipefail

html="${1:?usage: $0 REPORT.html [OUT.png]}"
png="${2:-${html%.html}.png}"
[ -f "$html" ] || { echo "no such file: $html" >&2; exit 2; }

browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
  if [ "$(id -u)" = 0 ] && [ -z "${NO_INSTALL:-}" ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    browser="$(command -v chromium)"
  else
    echo "chromium not found: install it with 'apt-get install chromium'" >&2
    exit 3
  fi
fi

profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
# A fresh profile and no background traffic: the page is local and must render offline.
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size=1200,2400 \
  --screenshot="$(realpath -m "$png")" "file://$(realpath "$html")" >/dev/null 2>&1
[ -s "$png" ] || { echo "chromium wrote no screenshot" >&2; exit 1; }
echo "$png"
