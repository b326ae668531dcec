"""AMX-backend tests build their kernels into a fresh cache directory, so a user's tuned
configurations and cached libraries never change what they test."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _lut_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("QCOMPILE_CACHE", str(tmp_path_factory.mktemp("qcompile-cache")))
    yield
    mp.undo()
