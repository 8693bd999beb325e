"""amp_dtype "auto": bf16 only on a device that computes it natively, float32 elsewhere (an AVX2-only CPU emulates
bf16 many times slower than float32), for training's autocast and for the torch inference runtimes alike."""

import logging

import pytest
import torch

from nucleiseg_monai import networks
from nucleiseg_monai.networks import MixedPrecision, UNet, resolve_dtype
from nucleiseg_monai.runtimes import CastNetwork, prepare_for_inference, prepare_network

TINY = (8, 16, 32, 64)


@pytest.fixture
def native(monkeypatch):
    """Sets whether the CPU has native bf16, and forgets which devices were already reported."""
    def set_native(value: bool):
        monkeypatch.setattr(networks, "native_bf16", lambda device: value)
        monkeypatch.setattr(networks, "_reported_precision", set())
    return set_native


def test_auto_is_bf16_only_where_native(native, caplog):
    native(True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    native(False)
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.networks"):
        assert resolve_dtype("auto", "cpu") is None
        assert resolve_dtype("auto", "cpu") is None
    assert sum("float32" in r.getMessage() for r in caplog.records) == 1  # said once, not per batch


def test_named_dtypes_are_kept_and_unknown_ones_refused():
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # forced, native or not
    assert resolve_dtype("float32", "cpu") is None and resolve_dtype(None, "cpu") is None
    for wrong in ("int8", "bf16", "Tensor", torch.int8):  # not a float dtype, not a torch name, not a dtype
        with pytest.raises(ValueError, match="amp_dtype must be 'auto'"):
            MixedPrecision(UNet(features=TINY), wrong)


def test_mixed_precision_auto_runs_float32_without_native_bf16(native):
    torch.manual_seed(0)
    net = UNet(features=TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    native(False)
    with torch.no_grad():
        plain = net(x)
        torch.testing.assert_close(MixedPrecision(net, "auto", channels_last=False)(x), plain)
    native(True)
    with torch.no_grad():
        mixed = MixedPrecision(net, "auto", channels_last=False)(x)
    assert not torch.equal(mixed, plain)  # bf16 rounding shows where it is native


def test_the_predictors_torch_runtime_keeps_float32_weights_without_native_bf16(native):
    net = UNet(features=TINY).eval()
    shape, cpu = (1, 3, 64, 64), torch.device("cpu")
    native(False)
    prepared = prepare_network(net, "torch", True, False, shape, "precision-test-emulated", cpu)
    assert isinstance(prepared, CastNetwork) and prepared.dtype == torch.float32
    native(True)
    assert prepare_network(net, "torch", True, False, shape, "precision-test-native", cpu).dtype == torch.bfloat16
    # asked for by name, bf16 is what a caller gets, native or not
    native(False)
    assert prepare_for_inference(net, "torch", torch.bfloat16).dtype == torch.bfloat16
