"""deploy/compose/compose.yaml as the compose tool Debian ships reads it (docker-compose
1.29: it refused the file while it had a top-level `name:`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "compose.yaml"


def test_debians_docker_compose_accepts_the_compose_file() -> None:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose missing: scripts/setup.sh installs it"
    result = subprocess.run(
        [tool, "-p", "p2pdist", "-f", str(COMPOSE), "config", "--services"],
        capture_output=True, text=True, timeout=60, cwd=COMPOSE.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["peer", "scheduler", "seed"]
