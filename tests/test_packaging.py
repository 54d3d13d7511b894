"""The distributions: what the sdist and the wheel carry, and (opt-in) a fresh install.

The sdist ships the library, not the tests (MANIFEST.in prunes them): the suite needs
the repository (conftest, tests/data, examples). The wheel carries ``py.typed``, the toy
builder and the license. ``EDGEMIND_TEST_INSTALL=1`` also installs the wheel into a
fresh venv from the lock file and runs ``edgemind --version`` and the toy builder there
(about a minute with a warm pip cache; off by default because it installs JAX).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SKIP = (".git", ".venv", "build", "dist", "models", "out", "*.egg-info", "__pycache__", ".*_cache")


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository without build products, so builds never touch the checkout."""
    tree = tmp_path_factory.mktemp("src") / "edgemind"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*_SKIP))
    return tree


def _sdist(tree: Path, out: Path) -> Path:
    """Build with the venv's setuptools (as ``python -m build --sdist --no-isolation``)."""
    code = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=tree, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(source_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps --no-build-isolation .``, as a packager would."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), "."],
        cwd=source_tree, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (built,) = out.glob("*.whl")
    return built


@pytest.mark.slow
def test_the_sdist_is_the_library_without_the_tests(source_tree: Path, tmp_path: Path) -> None:
    sdist = _sdist(source_tree, tmp_path)
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"} <= names
    assert {"edgemind/py.typed", "edgemind/examples/toy.py", "edgemind/cli.py"} <= names
    assert not any(name.startswith(("tests/", "bench/", "examples/")) for name in names)
    assert not any(name.endswith(".pyc") for name in names)


@pytest.mark.slow
def test_the_wheel_carries_types_the_toy_builder_and_the_license(wheel: Path) -> None:
    assert wheel.name.startswith("edgemind_runtime-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta).decode()
    assert {"edgemind/py.typed", "edgemind/examples/toy.py", "edgemind/__main__.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Name: edgemind-runtime" in metadata and "License-Expression: Apache-2.0" in metadata
    assert not any(n.startswith("tests/") for n in names)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("EDGEMIND_TEST_INSTALL") != "1",
    reason="installs the lock file into a fresh venv; set EDGEMIND_TEST_INSTALL=1",
)
def test_the_wheel_installs_and_works_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    lock = ROOT / "requirements.lock"
    subprocess.run([*pip, "--no-deps", "-r", str(lock)], check=True, timeout=600)
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=120)
    version = subprocess.run(
        [str(venv / "bin" / "edgemind"), "--version"],
        capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert version.stdout.startswith("edgemind 0.")
    model = tmp_path / "toy"
    subprocess.run(
        [str(py), "-m", "edgemind.examples.toy", str(model)], check=True, timeout=300, cwd=tmp_path
    )
    assert (model / "manifest.json").is_file()
