#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (the README's test command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The scrape test runs a real Prometheus server.
if ! command -v prometheus >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
            || echo "test: could not install prometheus; the scrape test will fail"
    else
        echo "test: install prometheus (e.g. sudo apt-get install prometheus) for the scrape test"
    fi
fi
exec .venv/bin/python -m pytest -q "$@"
