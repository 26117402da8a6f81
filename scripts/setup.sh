#!/usr/bin/env bash
# Idempotent setup for everything `make test` runs: the Debian tools the lab uses (registry,
# skopeo, containerd, docker, htpasswd, curl) and the venv module, installed with apt-get when
# missing (CI runs as root; elsewhere sudo is used if there is one), then the project venv at
# .venv with p2pdist installed editable with its dev extras (pytest, ruff, mypy, setuptools and
# wheel for the packaging test, the benchmark libraries the tests import).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

missing=()
packages=()
need() {  # need COMMAND DEBIAN-PACKAGE
    # dockerd lives in /usr/sbin, which a non-login PATH may lack.
    if ! command -v "$1" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$1" ]; then
        missing+=("$1")
        packages+=("$2")
    fi
}
need docker-registry docker-registry
need skopeo skopeo
need containerd containerd
need ctr containerd
need dockerd docker.io
need htpasswd apache2-utils
need curl curl
# tests/integration/test_compose.py checks deploy/compose with the compose tool Debian ships.
need docker-compose docker-compose
# tests/integration/test_deploy_edge.py renders deploy/edge with `kubectl kustomize` (offline).
need kubectl kubernetes-client
# `python3 -m venv` (setup, and the packaging test's clean venv) needs ensurepip on Debian.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=("$PYTHON -m venv")
    packages+=("python3-venv")
fi

if [ "${#packages[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages (missing: ${missing[*]})"
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "setup: not root and no sudo; install: ${packages[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq
    # shellcheck disable=SC2046  # one word per package, deduplicated
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        $(printf '%s\n' "${packages[@]}" | sort -u) >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.installed
if [ ! -x .venv/bin/p2pdist ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: pip install -e '.[dev]'"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
    touch "$stamp"
fi
