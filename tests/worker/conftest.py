"""Shared fixtures of the worker tests."""

from __future__ import annotations

import pytest

from difffit.settings import Settings
from worker.runtime import Runtime


@pytest.fixture
def runtime(tiny_base, tmp_path):
    settings = Settings(
        data_dir=tmp_path, base_model=tiny_base, adapter_slots=3, max_classes=10, allow_file_urls=True
    )
    rt = Runtime(settings)
    yield rt
    rt.engine.stop()
