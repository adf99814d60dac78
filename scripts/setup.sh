#!/usr/bin/env bash
# Everything the tests need on a fresh Debian machine: NBD clients from Debian, the
# Kubernetes test tools built from Go modules (cached), the Node 24 runtime the product ships on
# (the tests run every agent on it), promtool (checks the metrics and alerts), and the npm
# dependencies (which builds).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-debs.sh
scripts/test-tools.sh >/dev/null
scripts/node24.sh >/dev/null
scripts/promtool.sh >/dev/null
npm ci --no-audit --no-fund
