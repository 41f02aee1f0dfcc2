#!/usr/bin/env bash
# The test command: on a fresh Debian 12 machine it installs everything the tests need (Python packages with the
# CPU build of torch, the local Slurm cluster), starts the cluster, and runs every test. Re-runs reuse what exists.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${STRIDE_VENV:-.venv}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# Pin the CPU build: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"

bash slurm/cluster.sh up
eval "$(bash slurm/cluster.sh env)"
eval "$(STRIDE_PIP="$VENV/bin/pip" bash containers/setup.sh || echo 'exit 1')"   # container runtimes and test images

STRIDE_FORBID_SKIPS=1 exec "$VENV/bin/python" -m pytest -v -rs tests "$@"
