#!/bin/sh
# Debian's Chromium for the browser tests (tests/browser), installed when missing: Playwright
# drives it, as `playwright install` can't download a browser of its own here.
# Nothing to do when it is there. ATM_SKIP_BROWSER_INSTALL=1: never install (tests skip).
set -eu
CHROMIUM="${1:-/usr/bin/chromium}"
[ -x "$CHROMIUM" ] && exit 0
if [ "${ATM_SKIP_BROWSER_INSTALL:-0}" = 1 ]; then
    echo "browser tests: no $CHROMIUM, not installed (ATM_SKIP_BROWSER_INSTALL=1): they are skipped"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser tests: no $CHROMIUM and no apt-get: install Chromium there, or they are skipped"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    AS_ROOT=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    AS_ROOT="sudo -n"
else
    echo "browser tests: no $CHROMIUM; run 'sudo apt-get install -y chromium' to run them" \
         "(they are skipped until then)"
    exit 0
fi
apt_install() {
    DEBIAN_FRONTEND=noninteractive $AS_ROOT apt-get install -y -qq chromium >/dev/null
}
echo "browser tests: installing Debian's chromium (apt-get install chromium) ..."
# The package lists are refreshed only when the install fails without them (slow otherwise).
if ! apt_install; then
    $AS_ROOT apt-get update -qq && apt_install || {
        echo "browser tests: apt-get install chromium failed; ATM_SKIP_BROWSER_INSTALL=1 skips" \
             "the browser tests instead" >&2
        exit 1
    }
fi
[ -x "$CHROMIUM" ] || { echo "browser tests: chromium installed, but not at $CHROMIUM" >&2; exit 1; }
echo "browser tests: $("$CHROMIUM" --version 2>/dev/null || echo chromium) installed"
