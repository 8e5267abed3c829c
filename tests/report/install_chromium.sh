#!/usr/bin/env bash
# Install headless Chromium (Debian package `chromium`) for tests/test_report.py, which renders
# the Snakemake report and checks its images load. Idempotent; needs root (CI runs as root).
# Usage: bash tests/report/install_chromium.sh
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || true)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_chromium.sh: must run as root (apt-get install chromium)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# fonts: without any, text in the report (and in screenshots) renders as empty boxes
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "installed: $(chromium --version 2>/dev/null || echo chromium)"
