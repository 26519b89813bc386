#!/usr/bin/env bash
# Installs what tests/test_mlflow_ui.py needs: a Chromium (Debian's package, or the one at
# $CHROMIUM_PATH) and, in tests/browser, playwright-core from package-lock.json (Node.js 20+).
# Idempotent, and quick when everything is already there. Playwright's own browser downloads
# are never used. Exits non-zero with one line saying what is missing when it cannot install.
set -euo pipefail
cd "$(dirname "$0")/.."

NODE_MAJOR_MIN=20
chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"

if [ -n "${CHROMIUM_PATH:-}" ] && [ ! -x "$chromium" ]; then
    echo "install_browser_deps: CHROMIUM_PATH=$chromium is not an executable file" >&2
    exit 1
fi
if [ ! -x "$chromium" ]; then
    export DEBIAN_FRONTEND=noninteractive
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install_browser_deps: no Chromium at $chromium and no apt-get: install Chromium" \
            "and set CHROMIUM_PATH to its binary" >&2
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        # Never prompt for a password from make: sudo -n fails at once instead.
        if ! command -v sudo >/dev/null 2>&1 || ! sudo -n true 2>/dev/null; then
            echo "install_browser_deps: no Chromium at $chromium; install it as root" \
                "(apt-get install chromium) or set CHROMIUM_PATH to a Chromium binary" >&2
            exit 1
        fi
        apt-get() { sudo -n DEBIAN_FRONTEND=noninteractive apt-get "$@"; }
    fi
    echo "install_browser_deps: installing Debian chromium"
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
    echo "install_browser_deps: node and npm are not on PATH: install Node.js" \
        "$NODE_MAJOR_MIN+ (e.g. apt-get install nodejs npm)" >&2
    exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt "$NODE_MAJOR_MIN" ]; then
    echo "install_browser_deps: Node.js $(node --version) is too old; playwright-core needs" \
        "Node.js $NODE_MAJOR_MIN+" >&2
    exit 1
fi

browser_dir=tests/browser
stamp="$browser_dir/node_modules/.package-lock.json"
if [ ! -f "$stamp" ] || [ "$browser_dir/package-lock.json" -nt "$stamp" ]; then
    echo "install_browser_deps: npm ci in $browser_dir"
    (cd "$browser_dir" && npm ci --no-audit --no-fund)
fi
