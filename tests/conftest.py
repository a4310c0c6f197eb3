"""Shared pytest setup for fxquant's tests.

* ``tests/`` is importable, so test files share the harness: ``from models import MODELS``, ``import oracle``.
* One intra-op thread: the machine is shared, and results do not depend on the thread count.
* Markers: ``torchao`` (uses torch.ao as an oracle; skipped when absent), ``slow``.
* Hypothesis draws the same examples on every run (``derandomize``): CI runs once, so a test must not pass or
  fail by chance; ``HYPOTHESIS_PROFILE=explore`` draws new ones.
* Fixtures: ``torchao`` (the torch.ao.quantization module, or skip), ``torchao_lib`` / ``fxquant_lib``
  (:class:`oracle.Lib` drivers, or skip).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

torch.set_num_threads(1)

try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True)
    _hypothesis_settings.register_profile("explore", derandomize=False)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # (hypothesis is a test dependency; without it the property tests are not collected anyway)
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "torchao: uses torch.ao quantization as an oracle (skipped when absent)")
    config.addinivalue_line("markers", "slow: slower than a second or so")


@pytest.fixture
def torchao():
    import oracle
    return oracle.require_torchao()


@pytest.fixture
def torchao_lib():
    import oracle
    return oracle.torchao_lib()


@pytest.fixture
def fxquant_lib():
    import oracle
    return oracle.fxquant_lib()
