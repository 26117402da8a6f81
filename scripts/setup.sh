#!/usr/bin/env bash
# Idempotent setup: the Debian tools the lab uses (registry, skopeo, containerd, docker,
# htpasswd, curl) and the project venv at .venv with p2pdist installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for cmd in docker-registry skopeo containerd ctr dockerd htpasswd curl; do
    # dockerd lives in /usr/sbin, which a non-login PATH may lack.
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        docker-registry skopeo containerd docker.io apache2-utils curl >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi

stamp=.venv/.installed
if [ ! -x .venv/bin/p2pdist ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: pip install -e '.[dev]'"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
    touch "$stamp"
fi
