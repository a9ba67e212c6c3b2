#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (the README's test command; CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The scrape test runs a real Prometheus server; the NAT tests (tests/netns.py) build network namespaces behind
# an nftables router, so they need root and `nft`. One apt run installs whichever is missing.
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v nft >/dev/null || missing+=(nftables)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
            || echo "test: could not install ${missing[*]}; the tests that need them will fail"
    else
        echo "test: install ${missing[*]} as root (e.g. sudo apt-get install ${missing[*]}); the tests that need them will fail"
    fi
fi
exec .venv/bin/python -m pytest -q "$@"
