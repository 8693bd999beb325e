"""OpenVINO models kept on disk between processes (``openvino_cache``): a kept model computes what the built one
did, any change to what made it misses, and a damaged or unwritable cache costs time, never a run."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

import openvino as ov  # noqa: E402
import openvino.opset13 as ops  # noqa: E402

from nucleiseg_monai import openvino_cache, runtimes  # noqa: E402
from nucleiseg_monai.networks import UNet  # noqa: E402
from nucleiseg_monai.runtimes import prepare_for_inference  # noqa: E402


def scale_model(factor: float) -> ov.Model:
    """A one-operation OpenVINO model, x * factor: built in microseconds, unlike a converted network."""
    x = ops.parameter([1, 4], np.float32, name="x")
    return ov.Model([ops.multiply(x, ops.constant(np.float32(factor)))], [x], "scale")


def run(model: ov.Model) -> np.ndarray:
    # compiled as the package compiles, keeping this process's signal stack (runtimes._signal_stack_kept)
    return runtimes.compile_on_cpu(model)({0: np.arange(4, dtype=np.float32)[None]})[0]


class Builder:
    def __init__(self, factor: float = 3.0):
        self.factor, self.calls = factor, 0

    def __call__(self) -> ov.Model:
        self.calls += 1
        return scale_model(self.factor)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A cache of this test's own (the run's shared one holds other tests' models)."""
    monkeypatch.setenv("NUCLEISEG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NUCLEISEG_CACHE_DIR", str(tmp_path / "mine"))
    assert openvino_cache.cache_dir() == tmp_path / "mine" / "openvino"
    monkeypatch.delenv("NUCLEISEG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert openvino_cache.cache_dir() == tmp_path / "xdg" / "nucleiseg_monai" / "openvino"
    for off in ("off", "OFF", "0", "none"):
        monkeypatch.setenv("NUCLEISEG_CACHE_DIR", off)
        assert openvino_cache.cache_dir() is None


def test_a_kept_model_is_read_back_instead_of_built(cache):
    build = Builder()
    first = openvino_cache.load_or_build("k1", build)
    second = openvino_cache.load_or_build("k1", build)
    assert build.calls == 1
    np.testing.assert_array_equal(run(second), run(first))
    np.testing.assert_array_equal(run(second), [[0, 3, 6, 9]])
    assert [p.name for p in cache.iterdir()] == ["k1"]  # no staging folder left behind


def test_a_damaged_model_is_built_again_and_replaced(cache, caplog):
    openvino_cache.load_or_build("k2", Builder())
    (cache / "k2" / "model.xml").write_text("<not a model")
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.openvino_cache"):
        model = openvino_cache.load_or_build("k2", build)
    assert build.calls == 1 and "could not read the cached OpenVINO model" in caplog.text
    np.testing.assert_array_equal(run(model), [[0, 3, 6, 9]])
    again = Builder()
    openvino_cache.load_or_build("k2", again)
    assert again.calls == 0  # the rebuilt model was kept


def test_an_unwritable_cache_costs_time_not_the_run(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("NUCLEISEG_CACHE_DIR", str(blocker))  # a file where the folder should be
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.openvino_cache"):
        model = openvino_cache.load_or_build("k3", build)
    np.testing.assert_array_equal(run(model), [[0, 3, 6, 9]])
    assert build.calls == 1 and "NUCLEISEG_CACHE_DIR" in caplog.text


def test_a_save_killed_midway_is_cleaned_up_by_the_next(cache):
    """A cohort worker killed while it saves leaves a staging folder; the next save removes it."""
    code = ("import os, sys; from nucleiseg_monai.atomic import staging_folder; "
            "f = staging_folder(sys.argv[1]); (f / 'model.xml').write_text('half'); print(f, flush=True); "
            "os.kill(os.getpid(), 9)")
    done = subprocess.run([sys.executable, "-c", code, str(cache / "k5")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -9
    left = Path(done.stdout.strip())
    assert left.parent == cache and left.is_dir()
    openvino_cache.load_or_build("k6", Builder())
    assert not left.exists() and [p.name for p in cache.iterdir()] == ["k6"]


def test_off_keeps_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("NUCLEISEG_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build = Builder()
    openvino_cache.load_or_build("k4", build)
    openvino_cache.load_or_build(lambda: pytest.fail("a key made for a cache that is off"), build)
    assert build.calls == 2 and not any(tmp_path.iterdir())


def test_a_key_function_is_called_when_the_cache_is_on(cache):
    build = Builder()
    openvino_cache.load_or_build(lambda: "k5", build)
    openvino_cache.load_or_build(lambda: "k5", build)
    assert build.calls == 1 and [p.name for p in cache.iterdir()] == ["k5"]


def test_keys_differ_with_any_part_and_with_the_library_versions(monkeypatch):
    base = openvino_cache.model_key("net", "weights", "int8")
    assert base == openvino_cache.model_key("net", "weights", "int8")
    assert len({base, openvino_cache.model_key("net", "weights", "float32"),
                openvino_cache.model_key("net", "other weights", "int8"),
                openvino_cache.model_key("netweights", "int8")}) == 4
    monkeypatch.setattr(openvino_cache, "library_version", lambda package: "9.9" if package == "openvino" else "1")
    assert openvino_cache.model_key("net", "weights", "int8") != base


@pytest.mark.slow
def test_a_network_made_again_comes_from_the_cache_and_computes_the_same(cache, monkeypatch):
    torch.manual_seed(0)
    # 2 poolings, not 3: the five models the test makes take about 30% less time to export, convert and quantise
    # (28 s against 40 s for the whole test), and nothing the cache does depends on the depth
    net = UNet(features=(4, 8, 16)).eval()
    calibration = [torch.randn(1, 3, 64, 64) for _ in range(2)]
    x = torch.randn(2, 3, 96, 64)
    made = {dtype: prepare_for_inference(net, "openvino", dtype, (1, 3, 64, 64), calibration)(x)
            for dtype in ("int8", torch.float32)}
    kept = set(cache.iterdir())
    assert len(kept) == 2  # one model per precision

    def no_export(*args):
        raise AssertionError("exported again although the model was kept")

    export = runtimes._export
    monkeypatch.setattr(runtimes, "_export", no_export)
    for dtype, out in made.items():
        again = prepare_for_inference(net, "openvino", dtype, (2, 3, 128, 128), calibration)  # any multiple of 4
        torch.testing.assert_close(again(x), out, rtol=0, atol=0)

    # other weights, or other calibration inputs, are another model
    monkeypatch.setattr(runtimes, "_export", export)
    other = UNet(features=(4, 8, 16)).eval()
    prepare_for_inference(other, "openvino", torch.float32, (1, 3, 64, 64))
    prepare_for_inference(net, "openvino", "int8", (1, 3, 64, 64), calibration[:1])
    assert len(set(cache.iterdir()) - kept) == 2

    # calibration named by a key is made only when the model has to be made
    made_calibration = []

    def calibrate():
        made_calibration.append(1)
        return calibration

    first = prepare_for_inference(net, "openvino", "int8", (1, 3, 64, 64), calibrate, calibration_key="two tiles")
    again = prepare_for_inference(net, "openvino", "int8", (1, 3, 64, 64), calibrate, calibration_key="two tiles")
    assert made_calibration == [1]
    torch.testing.assert_close(again(x), first(x), rtol=0, atol=0)


def test_the_predictors_calibration_is_named_without_rendering_it(monkeypatch):
    mean, std = torch.full((1, 3, 1, 1), 128.0), torch.full((1, 3, 1, 1), 40.0)
    calibration = runtimes.SyntheticCalibration(mean, std, seeds=(1, 2), side=32)
    monkeypatch.setattr(runtimes, "synthetic_inputs", lambda *a: pytest.fail("rendered for the key"))
    key = calibration.key
    assert key == runtimes.SyntheticCalibration(mean, std, seeds=(1, 2), side=32).key
    assert key != runtimes.SyntheticCalibration(mean + 1, std, seeds=(1, 2), side=32).key
    assert key != runtimes.SyntheticCalibration(mean, std, seeds=(1, 3), side=32).key
    monkeypatch.undo()
    tiles = calibration()
    expected = runtimes.synthetic_inputs(mean, std, (1, 2), 32)
    assert len(tiles) == 2 and all(torch.equal(a, b) for a, b in zip(tiles, expected))
