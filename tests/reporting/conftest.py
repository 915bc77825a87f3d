from __future__ import annotations

import pytest

from tests.reporting.helpers import tiny_run


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp())
