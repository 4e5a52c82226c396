#!/usr/bin/env bash
# Ensure a Chromium for the browser test of the web page (tests/real/test_ui.py): Debian's
# `chromium` package, which Playwright (from the dev extras) drives as the system browser.
# Playwright's own browser download is never used.
set -euo pipefail

BROWSER=/usr/bin/chromium

if [ ! -x "$BROWSER" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends chromium >/dev/null
fi
echo "browser: $("$BROWSER" --version 2>/dev/null)"
