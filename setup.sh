#!/usr/bin/env bash
# Sets up .venv with everything the project needs (CPU or GPU machine). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and pinned: a bare `torch` requirement could pull a different multi-GB build.
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
