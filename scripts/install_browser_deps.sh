#!/usr/bin/env bash
# Installs what tests/test_mlflow_ui.py needs: Debian's chromium and, in tests/browser,
# playwright-core from package-lock.json. Idempotent, and quick when both are already there.
# Playwright's own browser downloads are never used: the tests drive /usr/bin/chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
    echo "install_browser_deps: installing Debian chromium"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "install_browser_deps: /usr/bin/chromium is missing; install Debian's chromium" \
                "package as root (apt-get install chromium)" >&2
            exit 1
        fi
        apt-get() { sudo DEBIAN_FRONTEND=noninteractive apt-get "$@"; }
    fi
    # apt-get update only when there are no package lists or they lack chromium, or the
    # install fails on stale lists.
    lists="$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | head -n 1)" \
        || lists=""
    if [ -z "$lists" ] || ! apt-cache show chromium >/dev/null 2>&1; then
        apt-get update
    fi
    if ! apt-get install -y --no-install-recommends chromium; then
        apt-get update
        apt-get install -y --no-install-recommends chromium
    fi
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "install_browser_deps: node and npm are required (Node.js 20+)" >&2
    exit 1
fi

browser_dir=tests/browser
stamp="$browser_dir/node_modules/.package-lock.json"
if [ ! -f "$stamp" ] || [ "$browser_dir/package-lock.json" -nt "$stamp" ]; then
    echo "install_browser_deps: npm ci in $browser_dir"
    (cd "$browser_dir" && npm ci --no-audit --no-fund)
fi
