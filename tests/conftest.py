import os

import pytest
import torch
from hypothesis import settings

# CI draws the same examples every run; MODFX_FUZZ_RANDOM=1 explores new ones
settings.register_profile("ci", max_examples=int(os.environ.get("MODFX_FUZZ_EXAMPLES", "6")), deadline=None,
                          derandomize=not os.environ.get("MODFX_FUZZ_RANDOM"))
settings.load_profile("ci")

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes: one thread each, no oversubscription
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
