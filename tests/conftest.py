"""pytest configuration of the bnorm_ext suite: fixtures and the `slow` marker.
Helpers shared by the test modules live in common_utils.py.
"""

import os
import random
import sys

import numpy as np
import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from common_utils import CUDA_AVAILABLE, CUDA_PATHS, SEED  # noqa: E402


@pytest.fixture(params=CUDA_PATHS)
def cuda_path(request, monkeypatch):
    if request.param == "two_pass":
        monkeypatch.setenv("BNORM_EXT_CUDA_SINGLE_READ", "0")
    else:
        monkeypatch.delenv("BNORM_EXT_CUDA_SINGLE_READ", raising=False)
    return request.param


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(SEED)
    if CUDA_AVAILABLE:
        torch.cuda.manual_seed_all(SEED)
    np.random.seed(SEED)
    random.seed(SEED)
    yield


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow/huge test, skipped unless --runslow or BNORM_EXT_RUNSLOW=1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("BNORM_EXT_RUNSLOW", "") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: use --runslow or BNORM_EXT_RUNSLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
