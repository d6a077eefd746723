"""Fixtures of the training tests: the recovery inputs and every launch, each made once per session."""

from __future__ import annotations

import pytest

from tests.training.recovery_harness import make_inputs, start_runs


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict:
    return make_inputs(tmp_path_factory.mktemp("recovery"))


@pytest.fixture(scope="session")
def runs(inputs) -> dict:
    return start_runs(inputs)
