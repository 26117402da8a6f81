"""The wheel carries only the product: built from a copy of the whole checkout (lab/,
benchmarks/ and tests/ included), it holds the p2pdist, scheduler, peer and seed packages and
nothing else, and installed alone into a clean venv it runs `p2pdist` while `import lab` fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = {"p2pdist", "scheduler", "peer", "seed"}
# What a build leaves behind, or caches: never part of the source the wheel is built from.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A copy, so the build's build/ and egg-info never land in the shared checkout.
    source = tmp_path_factory.mktemp("source") / "p2pdist"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    assert {"lab", "benchmarks", "tests"} <= {p.name for p in source.iterdir()}
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    (built,) = out.glob("p2pdist-*.whl")
    return built


def test_wheel_holds_the_product_packages_and_nothing_else(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == PRODUCT, f"the wheel holds {sorted(top - PRODUCT)} besides the product"
    assert "p2pdist/cli/main.py" in names
    assert not [n for n in names if n.startswith(("lab/", "benchmarks/", "tests/"))]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "p2pdist = p2pdist.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installed_alone_runs_the_cli_and_has_no_lab(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    # The product's dependencies come from this venv (system site-packages off, so they are
    # passed by path); only the wheel itself is installed.
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert install.returncode == 0, install.stderr
    deps = Path(trio.__file__).parents[1]  # this venv's site-packages, for trio & co.
    (Path(site) / "deps.pth").write_text(f"{deps}\n")
    clean = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}  # no PYTHONPATH: not the checkout
    probe = (
        "import sys, importlib.util as u; "
        "assert not u.find_spec('lab') and not u.find_spec('benchmarks') and not u.find_spec('tests'), "
        "[m for m in ('lab', 'benchmarks', 'tests') if u.find_spec(m)]; "
        "import p2pdist, scheduler, peer, seed; print(p2pdist.__file__)"
    )
    result = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, env=clean, cwd=tmp_path, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(site), result.stdout  # the installed copy, not the checkout
    cli = subprocess.run(
        [env_dir / "bin" / "p2pdist", "--help"],
        capture_output=True,
        text=True,
        env=clean,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0 and "scheduler" in cli.stdout, cli.stderr
