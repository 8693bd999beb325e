"""prepare_for_inference: every runtime gives eager float32's classes on a real tile, and warns about nothing.

The network is the small bundle's trained one (its widths read from the checkpoint, so a retrained bundle with
other widths still loads), on a synthetic H&E tile normalised with the bundle's channel statistics: a random
network's classes would be nearly constant and prove nothing. Tolerances (share of pixels whose argmax class
differs from eager float32) are a few times what benchmarks/results/runtimes.json measured on such tiles:
float32 runtimes differ only by summation order; bf16 rounds activations to 8 bits of mantissa; int8 more.
"""

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from nucleiseg_monai import runtimes
from nucleiseg_monai.data import load_stats
from nucleiseg_monai.networks import UNet, unet_from_checkpoint
from nucleiseg_monai.runtimes import CastNetwork, prepare_for_inference
from nucleiseg_monai.synthetic import make_tile
from conftest import same_up_to_ids

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "nuclei_unet_small"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-3, "int8": 1e-2}


@pytest.fixture(scope="module")
def trained_network() -> UNet:
    return unet_from_checkpoint(BUNDLE / "models" / "model.pt").eval()


def normalised_tile(seed: int, size: int = 256) -> torch.Tensor:
    stats = load_stats(BUNDLE / "models" / "channel_stats.json")
    rgb, _ = make_tile(size, seed=seed)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    return (x - torch.tensor(stats["mean"]).view(1, 3, 1, 1)) / torch.tensor(stats["std"]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tile_and_classes(trained_network):
    x = normalised_tile(seed=7)
    classes = classes_of(trained_network, x)
    shares = torch.bincount(classes.flatten(), minlength=3).float() / classes.numel()
    # the check means something only when the tile holds all three classes in some quantity
    assert (shares > 0.02).all(), f"class shares {shares.tolist()}"
    return x, classes


def classes_of(network, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return network(x)[:, :3].argmax(1)  # the classes; a fourth output is the distance map


def differing_share(runner, x: torch.Tensor, classes: torch.Tensor, outputs: int) -> float:
    with torch.inference_mode():
        out = runner(x)
    assert out.dtype == torch.float32 and out.shape == (x.shape[0], outputs, *x.shape[2:])
    return float((out[:, :3].argmax(1) != classes).float().mean())


@pytest.mark.parametrize("runtime, dtype", [("eager", torch.bfloat16), ("torch", torch.float32),
                                            ("torch", torch.bfloat16)])
def test_torch_runtimes_keep_the_classes(trained_network, tile_and_classes, runtime, dtype):
    x, classes = tile_and_classes
    prepared = prepare_for_inference(trained_network, runtime, dtype)
    assert differing_share(prepared, x, classes, trained_network.out_channels) <= TOLERANCE[dtype]


def test_torch_runtime_leaves_the_network_alone(trained_network):
    before = {k: v.clone() for k, v in trained_network.state_dict().items()}
    prepared = prepare_for_inference(trained_network, "torch", torch.bfloat16)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())  # folded in the copy
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in trained_network.modules()) > 0
    after = trained_network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and after["head.weight"].dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
def test_openvino_keeps_the_classes(trained_network, tile_and_classes, dtype):
    pytest.importorskip("openvino")
    if dtype == "int8":
        pytest.importorskip("nncf")
    x, classes = tile_and_classes
    calibration = [normalised_tile(seed) for seed in (100, 101, 102, 103)]  # not the tile checked
    prepared = prepare_for_inference(trained_network, "openvino", dtype, calibration=calibration, threads=1)
    assert differing_share(prepared, x, classes, trained_network.out_channels) <= TOLERANCE[dtype]
    # the exported graph takes other batch sizes and window sizes (multiples of 2**depth) too
    other = torch.cat([normalised_tile(seed=8, size=128)[..., :96], normalised_tile(seed=9, size=128)[..., :96]])
    other_classes = classes_of(trained_network, other)
    assert differing_share(prepared, other, other_classes, trained_network.out_channels) <= TOLERANCE[dtype]


def _no_warnings(runtime: str, network: torch.nn.Module, x: torch.Tensor) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = prepare_for_inference(network, runtime, torch.bfloat16)
        with torch.inference_mode():
            prepared(x)
            prepared(x)
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def test_the_check_sees_tracer_warnings(trained_network, tile_and_classes):
    """Control: the predictor's former path (torch.jit trace) warns, so an empty list below means something."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(trained_network, tile_and_classes[0], check_trace=False)
    assert any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)


def test_torch_runtime_warns_about_nothing(trained_network, tile_and_classes):
    # a corner of the tile: warnings do not depend on its size, and bf16 is slow where it is emulated (AVX2)
    assert _no_warnings("torch", trained_network, tile_and_classes[0][..., :64, :64]) == []


@pytest.mark.slow
def test_recommended_runtime_warns_about_nothing(trained_network, tile_and_classes):
    assert _no_warnings("auto", trained_network, tile_and_classes[0]) == []


def test_auto_falls_back_to_torch_without_openvino(trained_network, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(runtimes.importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    assert isinstance(prepare_for_inference(trained_network, "auto"), CastNetwork)
    with pytest.raises(ImportError, match=r"cpu-runtimes"):
        prepare_for_inference(trained_network, "openvino")


def test_int8_refuses_without_calibration_or_openvino(trained_network):
    with pytest.raises(ValueError, match="needs runtime 'openvino'"):
        prepare_for_inference(trained_network, "torch", "int8")
    if importlib.util.find_spec("openvino") is not None:
        with pytest.raises(ValueError, match="needs calibration"):
            prepare_for_inference(trained_network, "openvino", "int8")


@pytest.mark.slow
def test_the_shipped_fast_path_gives_the_instances_of_plain_float32(tmp_path):
    """The bundle's predictor as shipped (runtime auto: OpenVINO int8 where NNCF is installed, else bf16) against
    the same weights run plainly (eager float32), both with the bundle's windows, on synthetic tiles with known
    nuclei: nearly every nucleus found the same way, so a future speed change cannot trade accuracy unnoticed."""
    import tifffile

    from nucleiseg_monai.inference import SlidePredictor
    from nucleiseg_monai.metrics import instance_metrics

    for seed in (3, 4):
        rgb, _ = make_tile(768, seed=seed)
        tifffile.imwrite(tmp_path / f"t{seed}.tif", rgb, photometric="rgb", resolution=(4e4, 4e4),
                         resolutionunit="CENTIMETER")
    fast = SlidePredictor.from_bundle(BUNDLE, progress=False)
    plain = SlidePredictor.from_bundle(BUNDLE, progress=False, runtime="eager", amp=False, int8=False,
                                       channels_last=False)
    assert fast.run(tmp_path, tmp_path / "fast").ok and plain.run(tmp_path, tmp_path / "plain").ok
    for seed in (3, 4):
        a = tifffile.imread(tmp_path / "fast" / f"t{seed}.labels.tif")
        b = tifffile.imread(tmp_path / "plain" / f"t{seed}.labels.tif")
        agreement = instance_metrics(a, b)  # the plain path's nuclei as the truth
        assert agreement["n_true"] > 50, "the tile must hold enough nuclei to mean something"
        # stated tolerance: at least 97% of the nuclei matched (IoU > 0.5) and AJI >= 0.95 between the two paths
        assert agreement["f1"] >= 0.97 and agreement["aji"] >= 0.95, agreement


@pytest.mark.slow
def test_the_shipped_predictor_gives_the_same_labels_in_regions_as_in_one(tmp_path):
    """Seams with the real network as shipped: each region's margin (128 px) covers what the network sees, and the
    watershed breaks ties by each pixel's surroundings, so 2 x 2 regions give one region's labels pixel for pixel
    (``benchmarks/seams_real.py`` measures the same on real tissue)."""
    import numpy as np
    import tifffile

    from nucleiseg_monai.inference import SlidePredictor

    rgb, _ = make_tile(768, seed=8)  # with queue-order ties, one nucleus of this tile differed
    tifffile.imwrite(tmp_path / "t.tif", rgb, photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    predictor = SlidePredictor.from_bundle(BUNDLE, progress=False)  # one network build for both runs
    maps = []
    for region_size in (384, 768):
        predictor.planner.region_size = region_size
        result = predictor.predict_slide(tmp_path / "t.tif", tmp_path / str(region_size))
        assert result.regions == (4 if region_size == 384 else 1)
        maps.append(tifffile.imread(tmp_path / str(region_size) / "t.labels.tif").astype(np.int64))
    regions, whole = maps
    assert regions.max() == whole.max() > 100
    assert same_up_to_ids(regions, whole) and len(np.unique(regions)) == regions.max() + 1


def test_int8_under_auto_gives_way_where_it_cannot_run(monkeypatch, caplog):
    """The shipped ``int8: true`` must not break a machine without NNCF: "auto" then runs without int8 and says so, while
    an explicit "eager" refuses int8 outright."""
    from nucleiseg_monai import inference

    tiny = UNet(features=(8, 16, 32, 64)).eval()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(runtimes.importlib.util, "find_spec",
                        lambda name, *a: None if name == "nncf" else real_find_spec(name, *a))
    asked = {}
    # the decision is under test, not OpenVINO's export (seconds to tens of seconds, tested elsewhere)
    monkeypatch.setattr(inference, "prepare_network",
                        lambda network, runtime, amp, *a: asked.update(runtime=runtime, amp=amp, calibration=a[-1])
                        or network)
    with caplog.at_level("INFO", logger="nucleiseg_monai.inference"):
        net = inference.InferenceNetwork(tiny, [128] * 3, [40] * 3, roi_size=None, runtime="auto", amp=True,
                                         int8=True)
    assert net.int8 is False and "int8 needs OpenVINO and NNCF" in caplog.text
    assert asked == {"runtime": "auto", "amp": True, "calibration": None}
    monkeypatch.undo()
    with pytest.raises(ValueError, match="int8 runs on OpenVINO"):
        inference.InferenceNetwork(tiny, [128] * 3, [40] * 3, roi_size=None, runtime="eager", int8=True)


FREED_IN_ORDER_THEN_CTRL_C = """
import ctypes, os, signal
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import torch
from nucleiseg_monai import openvino_cache
from nucleiseg_monai.networks import UNet
from nucleiseg_monai.runtimes import prepare_for_inference

def signal_stack():
    state = ctypes.create_string_buffer(64)
    assert ctypes.CDLL(None).sigaltstack(None, state) == 0
    return state.raw[:24]

def one_operation(key, build):  # compiled as the network's model would be, without its seconds of conversion
    x = ops.parameter([-1, 3, -1, -1], np.float32)
    return ov.Model([ops.multiply(x, ops.constant(np.float32(2)))], [x])

openvino_cache.load_or_build = one_operation
before = signal_stack()
first = prepare_for_inference(UNet(features=(4, 8, 16)), "openvino", torch.float32)
second = prepare_for_inference(UNet(features=(4, 8, 16)), "openvino", torch.float32)
print("kept after compiling:", signal_stack() == before)
print("computes:", torch.equal(second(torch.ones(1, 3, 16, 16)), torch.full((1, 3, 16, 16), 2.0)))
del first, second  # freed in the order they were made, as a predictor's network and a later one's would be
print("kept after freeing:", signal_stack() == before)
handled = []
signal.signal(signal.SIGINT, lambda *_: handled.append(True))
os.kill(os.getpid(), signal.SIGINT)
print("Ctrl-C handled:", handled == [True])
"""


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None or not sys.platform.startswith("linux"),
                    reason="needs OpenVINO, and Linux's sigaltstack")
def test_openvino_networks_freed_in_the_order_made_leave_ctrl_c_working(tmp_path):
    # OpenVINO 2026.4 left the compiling thread on the freed signal stack of the first network: the Ctrl-C then
    # ended the process with a segmentation fault (return code -11) instead of reaching its handler
    env = {**os.environ, "NUCLEISEG_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", FREED_IN_ORDER_THEN_CTRL_C], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["kept after compiling: True", "computes: True", "kept after freeing: True",
                                        "Ctrl-C handled: True"]
