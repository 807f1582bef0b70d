import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=int(os.environ.get("MODFX_FUZZ_EXAMPLES", "6")), deadline=None)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
