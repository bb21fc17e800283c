#!/usr/bin/env bash
# Headless Chromium for the report's browser test (tests/test_report_html.py), from Debian's own packages.
# Idempotent: does nothing when a chromium binary is already on PATH. Installing needs root (as in CI).
set -euo pipefail
for binary in chromium-headless-shell chromium; do
    if command -v "$binary" >/dev/null; then
        echo "browser: $(command -v "$binary")"
        exit 0
    fi
done
if [ "$(id -u)" != 0 ]; then
    echo "browser: no chromium found and not root; install Debian's chromium-headless-shell (or chromium) to run" \
         "the report's browser test" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium-headless-shell \
    || apt-get install -y -qq --no-install-recommends chromium
