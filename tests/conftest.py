"""Shared fixtures: the toy model, built once per test session."""

from __future__ import annotations

import pytest

from examples.toy_model.build import build_toy_model


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory):
    """A read-only toy model directory (tests that damage files copy it first)."""
    return build_toy_model(tmp_path_factory.mktemp("models") / "toy")
