#!/usr/bin/env bash
# Set up (or refresh) .venv with tinylm installed in editable mode. `bootstrap.sh dev` adds the test tools.
# torch is pinned to 2.13.0 first: that is the CPU build on these machines; an unpinned torch would pull
# several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
log=.venv/bootstrap.log

pip_install() {
    # pip's build chatter goes to the log; on failure its tail is shown.
    if ! .venv/bin/python -m pip install --disable-pip-version-check "$@" >>"$log" 2>&1; then
        echo "bootstrap: pip install $* failed; last lines of $log:" >&2
        tail -n 25 "$log" >&2
        exit 1
    fi
}

[ -x .venv/bin/python ] || python3 -m venv .venv
: >"$log"
echo "bootstrap: installing torch==2.13.0 and tinylm${extras} into .venv ..." >&2
pip_install "torch==2.13.0"
pip_install -e ".${extras}"
