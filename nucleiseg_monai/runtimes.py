"""A network made fast for inference, and the one the predictor keeps.

``prepare_for_inference`` copies a trained network into a runtime that only infers: batch norm folded and weights
cast (``"torch"``, any device), or a ``torch.export`` graph compiled by OpenVINO on the CPU, in bf16, float32 or
int8 (NNCF's post-training quantisation on a few input tiles), kept on disk for the next process
(``openvino_cache``). ``prepare_network`` is the predictor's door to it: the precision the device computes, the
int8 inputs made of fixed synthetic tiles (``SyntheticCalibration``), and the last prepared network shared by the
predictors a process builds with the same weights and settings.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import importlib.util
import io
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .networks import MixedPrecision, resolve_dtype, weights_sha256

logger = logging.getLogger(__name__)

# the input side a fast runtime is prepared with when windows are whole regions (its graph takes any multiple of 16)
EXAMPLE_SIDE = 256
# int8 ranges come from the synthetic tiles of these seeds, EXAMPLE_SIDE px each
INT8_CALIBRATION_SEEDS = range(2000, 2008)

# "eager" runs the network as trained (``networks.MixedPrecision``)
RUNTIMES = ("auto", "openvino", "torch", "eager")


def fold_batch_norm(network: nn.Module) -> nn.Module:
    """Folds every eval-mode BatchNorm2d into the Conv2d just before it, in place; the BatchNorm becomes Identity.

    This is what ``torch.jit.freeze`` did to the graph: one convolution instead of a convolution and a normalisation.
    """
    for module in network.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
    return network


class CastNetwork(nn.Module):
    """A network with batch norm folded and its weights stored in ``dtype``, run channels-last; float32 out.

    Unlike autocast, the weights are cast once instead of on every call.
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.network = fold_batch_norm(copy.deepcopy(network).eval()).to(dtype=dtype, memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.to(dtype=self.dtype, memory_format=torch.channels_last)).float()


class OpenVINONetwork(nn.Module):
    """An OpenVINO compiled model behind a torch module: float32 (N, C, H, W) tensor in, float32 logits out.

    One infer request, locked, because the inference pipeline may call the network from a prefetch thread.
    """

    def __init__(self, compiled_model):
        super().__init__()
        self.compiled_model = compiled_model
        self.request = compiled_model.create_infer_request()
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        with self.lock:
            out = self.request.infer({0: array})[0]  # copied out of the request's buffer (share_outputs=False)
        return torch.from_numpy(out).to(x.device)


def _libc_sigaltstack():
    """libc's ``sigaltstack``, or None where there is none (Windows) or it cannot be found."""
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).sigaltstack
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _signal_stack_kept():
    """Puts the calling thread's alternate signal stack back as it was when the block ends.

    OpenVINO's ``compile_model`` gives the compiling thread an alternate signal stack of its own and, when the compiled
    model is freed, puts back the stack it found. Two models freed in the order they were made leave the thread on a
    freed stack, and Python runs its signal handlers on that stack (``SA_ONSTACK``): the next Ctrl-C, or the SIGCHLD
    a DataLoader's worker sends, kills the process with a segmentation fault. With the thread's own stack put back at
    once, OpenVINO's is never in use, and whatever a freed model puts back is the stack the thread had.
    """
    sigaltstack = _libc_sigaltstack()
    if sigaltstack is None:
        yield
        return
    saved = ctypes.create_string_buffer(64)  # a stack_t (24 bytes on 64-bit Linux and macOS), kept as libc gave it
    kept = sigaltstack(None, saved) == 0
    try:
        yield
    finally:
        if kept and sigaltstack(saved, None) != 0:
            logger.warning("could not restore this thread's signal stack after compiling the OpenVINO model "
                           "(errno %d); a Ctrl-C after such models are freed may crash the process", ctypes.get_errno())


def compile_on_cpu(model, config: dict | None = None):
    """``openvino.Core().compile_model(model, "CPU", config)``, leaving the calling thread's signal stack as it was
    (``_signal_stack_kept``). Every OpenVINO model this package, its tests and benchmarks run is compiled here."""
    import openvino as ov

    with _signal_stack_kept():
        return ov.Core().compile_model(model, "CPU", config or {})


def _dynamic_sides(network: nn.Module, example_shape: Sequence[int]) -> bool:
    """Whether the exported graph takes any height and width (multiples of ``network.multiple``), or only the
    example's."""
    multiple = getattr(network, "multiple", None)
    return isinstance(multiple, int) and all(int(s) % multiple == 0 for s in example_shape[2:])


def _export(network: nn.Module, example_shape: Sequence[int]) -> torch.export.ExportedProgram:
    """``torch.export`` of a float32 network with dynamic batch, and dynamic height and width where the network
    states the multiple it needs (``UNet.multiple``)."""
    n, c, h, w = (int(s) for s in example_shape)
    # an example batch of 1 would make export specialise the batch to 1 (0/1 specialisation)
    example = torch.zeros(max(n, 2), c, h, w)
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if _dynamic_sides(network, example_shape):
        multiple = network.multiple
        dims[2] = multiple * torch.export.Dim("height_blocks", min=1, max=65536 // multiple)
        dims[3] = multiple * torch.export.Dim("width_blocks", min=1, max=65536 // multiple)
    with torch.no_grad():
        return torch.export.export(copy.deepcopy(network).float().eval(), (example,), dynamic_shapes=(dims,))


def _samples(calibration: Iterable | Callable[[], Iterable]) -> list[np.ndarray]:
    return [np.asarray(t, dtype=np.float32) for t in (calibration() if callable(calibration) else calibration)]


def _openvino_network(network: nn.Module, dtype, example_shape: Sequence[int],
                      calibration: Iterable | Callable[[], Iterable] | None, calibration_key: str | None,
                      threads: int | None, weights: str | None) -> OpenVINONetwork:
    import openvino as ov

    from .openvino_cache import load_or_build, model_key

    samples: list[np.ndarray] | None = None

    def calibration_samples() -> list[np.ndarray]:
        nonlocal samples
        if samples is None:
            samples = _samples(calibration)
        return samples

    def key() -> str:
        if dtype != "int8":
            inputs = "no calibration"
        elif calibration_key is not None:
            inputs = f"calibration {calibration_key}"
        else:
            digest = hashlib.sha256()
            for sample in calibration_samples():
                digest.update(f"{sample.shape};".encode())
                digest.update(np.ascontiguousarray(sample).tobytes())
            inputs = f"calibration values {digest.hexdigest()}"
        sides = "any" if _dynamic_sides(network, example_shape) else "x".join(str(int(s)) for s in example_shape[2:])
        return model_key(repr(network), weights or weights_sha256(network), str(dtype), inputs,
                         f"channels {int(example_shape[1])}, sides {sides}")

    def build():
        with warnings.catch_warnings():
            # torch's own run_decompositions (which OpenVINO's converter calls) deep-copies a pytree LeafSpec and
            # so warns about an API it uses itself; nothing in this package or in the network can change that
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            model = ov.convert_model(_export(network, example_shape))
        if dtype == "int8":
            import nncf

            data = calibration_samples()
            with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws progress bars for a few seconds' work
                model = nncf.quantize(model, nncf.Dataset(data), subset_size=len(data))
        return model

    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        # pinned threads fight with whatever else runs on the cores (post-processing, another process)
        "ENABLE_CPU_PINNING": False,
    }
    if dtype != "int8":
        config["INFERENCE_PRECISION_HINT"] = "bf16" if dtype == torch.bfloat16 else "f32"
    return OpenVINONetwork(compile_on_cpu(load_or_build(key, build), config))


def prepare_for_inference(
    network: nn.Module,
    runtime: str = "auto",
    dtype: torch.dtype | str | None = torch.bfloat16,
    example_shape: Sequence[int] = (1, 3, 256, 256),
    calibration: Iterable | Callable[[], Iterable] | None = None,
    threads: int | None = None,
    calibration_key: str | None = None,
    weights_sha256: str | None = None,
) -> nn.Module:
    """A copy of ``network`` made for fast inference only: float32 (N, C, H, W) in, float32 logits out.

    Replaces the TorchScript trace + freeze (``torch.jit`` is deprecated from torch 2.13 and its tracer warns on
    every run); ``network`` itself is left as it is. Runtimes (figures in benchmarks/results/runtimes.json):

    * ``"openvino"``: ``torch.export`` graph converted to OpenVINO, CPU only (``pip install .[cpu-runtimes]``).
      ``dtype`` bfloat16 or float32 sets its inference precision; ``"int8"`` is post-training quantisation with
      NNCF on ``calibration`` (a few normalised input tiles), which changes outputs more than bf16 does. The
      model is kept on disk for the next process (``openvino_cache``), keyed by the calibration's values, or by
      ``calibration_key``, a name that stands for them: then ``calibration`` may be a function that makes the
      tiles, called only when the model is not kept. ``weights_sha256``: the weights' digest where the caller
      has it (``weights_sha256``), else computed for the key; with the cache off, no key is made.
    * ``"torch"``: batch norm folded into the convolutions, weights stored in ``dtype``, channels-last; any device.
    * ``"eager"``: ``MixedPrecision`` (autocast), as in training.
    * ``"auto"``: OpenVINO on a CPU when it is installed, else ``"torch"``.

    ``example_shape`` is one input's shape (batch, channels, height, width); the exported graphs also take other
    batch sizes and any height and width that are multiples of ``network.multiple``.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if isinstance(dtype, str) and dtype != "int8":
        dtype = getattr(torch, dtype)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.bfloat16, "int8"):
        raise ValueError(f"dtype must be float32, bfloat16 or 'int8', got {dtype!r}")
    device = next(network.parameters()).device
    if runtime == "auto":
        openvino_usable = device.type == "cpu" and importlib.util.find_spec("openvino") is not None
        runtime = "openvino" if openvino_usable or dtype == "int8" else "torch"
    if runtime != "openvino" and dtype == "int8":
        raise ValueError(f"dtype 'int8' needs runtime 'openvino', got runtime {runtime!r}")
    if runtime == "openvino":
        if device.type != "cpu":
            raise ValueError(f"runtime 'openvino' runs on the CPU, but the network is on {device}; "
                             "use runtime 'torch' or move the network to the CPU")
        if importlib.util.find_spec("openvino") is None:
            raise ImportError("runtime 'openvino' needs OpenVINO: pip install 'nucleiseg-monai[cpu-runtimes]', "
                              "or use runtime 'torch'")
        if dtype == "int8" and calibration is None:
            raise ValueError("dtype 'int8' needs calibration: a few network inputs (normalised tiles, (N, C, H, W) "
                             "tensors or arrays) to set the quantisation ranges")
        if dtype == "int8" and importlib.util.find_spec("nncf") is None:
            raise ImportError("dtype 'int8' quantises with NNCF: pip install nncf, or use dtype bfloat16")
        return _openvino_network(network, dtype, example_shape, calibration, calibration_key, threads, weights_sha256)
    if runtime == "torch":
        return CastNetwork(network, dtype).eval()
    return MixedPrecision(copy.deepcopy(network), None if dtype == torch.float32 else dtype).eval()


_prepared: tuple[tuple, torch.nn.Module] | None = None  # the last network prepare_for_inference made (see below)


def prepare_network(network: torch.nn.Module, runtime: str, amp: bool, channels_last: bool,
                    example_shape: tuple[int, int, int, int], weights: str, device: torch.device,
                    int8_calibration: SyntheticCalibration | None = None) -> torch.nn.Module:
    """The network as it runs inference: ``"eager"`` as trained (bf16 autocast with ``amp``, channels-last with
    ``channels_last``), else ``prepare_for_inference`` with that runtime in bf16 (``amp``) or float32, or
    quantised to int8 on the inputs ``int8_calibration()`` makes (OpenVINO only; ``int8_calibration.key`` names
    them in the disk cache's key). bf16 applies only where the device has it natively (``networks.native_bf16``);
    elsewhere ``amp`` runs float32.

    OpenVINO's export and compilation take seconds per predictor, so the last prepared network is kept and shared
    by predictors built later in the process with the same weights (``weights``: their SHA-256), runtime, precision,
    shape, ``device``, thread count and int8 calibration inputs (z-scored with the channel statistics, so other
    statistics make another model) (a cohort worker, a benchmark, a test module); it is only ever run, never
    changed. A new process reads the OpenVINO model an earlier one made from the disk cache (``openvino_cache``)
    instead of making it again.
    """
    global _prepared
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r} (predictor#network#runtime)")
    int8 = int8_calibration is not None
    if int8 and runtime not in ("auto", "openvino"):
        raise ValueError(f"int8 runs on OpenVINO: set predictor#network#runtime to 'auto' or 'openvino' "
                         f"(got {runtime!r}), or int8 to false")
    # bf16 where native, else float32; not asked where int8 runs, so that its log line does not claim float32
    precision = resolve_dtype("auto", device) if amp and not int8 else None
    if runtime == "eager":
        return MixedPrecision(network, precision, channels_last) if (amp or channels_last) else network
    dtype = "int8" if int8 else precision or torch.float32
    # int8's ranges are set on inputs z-scored with the channel statistics: other statistics, another model
    calibration = int8_calibration.key if int8 else None
    key = (weights, runtime, str(dtype), example_shape, str(device), torch.get_num_threads(), calibration)
    if _prepared is None or _prepared[0] != key:
        _prepared = None  # the old copy goes before the new one is built
        if int8:
            threads = torch.get_num_threads()
            logger.info("the network runs in OpenVINO, quantised to int8 (%d thread%s)", threads, "s"[:threads != 1])
        _prepared = (key, prepare_for_inference(network, "openvino" if int8 else runtime, dtype,
                                                example_shape=example_shape,
                                                calibration=int8_calibration,
                                                calibration_key=calibration,
                                                weights_sha256=weights))
    return _prepared[1]


def int8_available(device: torch.device) -> bool:
    """Whether runtime "auto" can run int8 here: a CPU, with OpenVINO and NNCF installed."""
    return device.type == "cpu" and all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))


def synthetic_inputs(mean: torch.Tensor, std: torch.Tensor, seeds: Iterable[int] = INT8_CALIBRATION_SEEDS,
                     side: int = EXAMPLE_SIDE) -> list[torch.Tensor]:
    """Network inputs made of synthetic H&E tiles (``synthetic.make_tile``, one per seed), z-scored with ``mean``
    and ``std`` ((1, 3, 1, 1)). By default the inputs int8 ranges are set on: fixed, so that every run of a bundle
    quantises the same way, whatever slide comes first."""
    from .synthetic import make_tile

    return [((torch.from_numpy(make_tile(side, seed=int(seed))[0]).permute(2, 0, 1)[None].float() - mean.cpu())
             / std.cpu()).contiguous() for seed in seeds]


class SyntheticCalibration:
    """The inputs int8 ranges are set on: ``synthetic_inputs`` with a network's channel statistics (``mean``,
    ``std``). ``key`` names them for the OpenVINO model cache without making them (seconds of rendering), and
    changes with the code that renders them."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, seeds: Iterable[int] = INT8_CALIBRATION_SEEDS,
                 side: int = EXAMPLE_SIDE):
        self.mean, self.std, self.seeds, self.side = mean, std, tuple(int(s) for s in seeds), int(side)

    def __call__(self) -> list[torch.Tensor]:
        return synthetic_inputs(self.mean, self.std, self.seeds, self.side)

    @property
    def key(self) -> str:
        from . import synthetic

        renderer = hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()
        return (f"synthetic tiles {self.seeds} of {self.side} px, mean {self.mean.flatten().tolist()}, "
                f"std {self.std.flatten().tolist()}, synthetic.py {renderer}")
