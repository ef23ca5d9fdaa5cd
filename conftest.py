"""Test-wide fixtures: doctests see torch; every test starts from the same seed."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    doctest_namespace["torch"] = torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
