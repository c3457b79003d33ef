#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv; idempotent, run as root (as CI does).
#   chromium: the headless browser check of the MLflow UI (tests/tracking/test_mlflow_ui.py).
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    echo "install-system-deps: chromium already present: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: $CHROMIUM missing and not root; run as root: apt-get install -y chromium" >&2
    exit 1
fi

echo "install-system-deps: $CHROMIUM missing; installing Debian package chromium"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
echo "install-system-deps: installed $("$CHROMIUM" --version 2>/dev/null)"
