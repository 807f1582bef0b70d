"""timm ViTs transform too, where timm can be installed (it needs torchvision, which does not import
beside the CPU torch 2.13 build on the CI machines, so this test is skipped there)."""

import pytest
import torch

import modfx

try:
    import timm
except Exception as e:  # noqa: BLE001 - torchvision fails with a RuntimeError, not an ImportError
    pytest.skip(f"timm does not import here: {type(e).__name__}: {e}", allow_module_level=True)


def test_timm_vit_capacity_one_reproduces_the_model():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    mod = modfx.transform(model, (x,), capacity=1.0, weighting="none")
    assert len(modfx.plan(mod).blocks) == 2
    torch.testing.assert_close(mod(x), model(x), rtol=1e-5, atol=1e-5)
