"""deploy/compose/compose.yaml as the compose tool Debian ships reads it (docker-compose
1.29: it refused the file while it had a top-level `name:`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "compose.yaml"


def compose_config(tool: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "-p", "p2pdist", "-f", str(COMPOSE), "config", "--services"],
        capture_output=True, text=True, timeout=60, cwd=COMPOSE.parent, env=env,
    )  # fmt: skip


def test_debians_docker_compose_accepts_the_compose_file() -> None:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose missing: scripts/setup.sh installs it"
    # As deploy/compose/.env gives it: every service requires the cluster secret.
    without = {k: v for k, v in os.environ.items() if k != "P2PDIST_CLUSTER_SECRET"}
    result = compose_config(tool, {**without, "P2PDIST_CLUSTER_SECRET": "a-generated-secret-0123456789"})
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["peer", "scheduler", "seed"]
    # Without it the file is refused, saying what to do, rather than run the cluster open.
    if not (COMPOSE.parent / ".env").exists():
        refused = compose_config(tool, without)
        assert refused.returncode != 0 and "create deploy/compose/.env first" in refused.stderr
