"""What every benchmark of the package shares: timing, rounding, memory per phase, the environment, logging."""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from nucleiseg_monai.networks import native_bf16

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STATS = ([180.0, 120.0, 170.0], [40.0, 45.0, 35.0])  # z-scoring when no bundle or datalist has any

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def sig(x: float, digits: int = 4) -> float:
    """Round to significant digits; ratios are computed from the rounded figures, so the JSON is consistent."""
    return float(f"{x:.{digits}g}") if x and math.isfinite(x) else x


def rate(amount: float, times: list[float], unit: str) -> dict:
    """``amount`` (megapixels or images) per call over the median call time."""
    median = statistics.median(times)
    return {f"{unit}_per_s": sig(amount / median), "median_s": sig(median), "min_s": sig(min(times)),
            "repeats": len(times)}


def ratio(a: float, b: float) -> float:
    return sig(a / b)


def tiles(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """A fixed batch of random tiles: network speed does not depend on the pixels."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


def forward_rate(net: Callable, x: torch.Tensor, args, grad_mode: str = "inference_mode") -> dict:
    """Megapixels per second of ``net`` on the batch ``x``."""
    context = torch.no_grad if grad_mode == "no_grad" else torch.inference_mode

    def call() -> None:
        with context():
            net(x)

    times = time_calls(call, x.device, args.warmup, args.repeats)
    return rate(x.shape[0] * x.shape[-2] * x.shape[-1] / 1e6, times, "mp")


class Phases:
    """Wall time and peak resident memory per phase (VmHWM after resetting it via /proc/self/clear_refs)."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.cuda_peaks: dict[str, float] = {}
        self.overall_mb = self._ru_maxrss_mb()
        self.resettable = self._reset()

    @staticmethod
    def _ru_maxrss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm_mb() -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        # the reset also lowers ru_maxrss, so the overall peak is kept here across resets
        self.overall_mb = max(self.overall_mb, self._ru_maxrss_mb())
        if self.resettable:
            self._reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = sig(time.perf_counter() - t0, 3)
            if torch.cuda.is_available():
                self.cuda_peaks[name] = sig(torch.cuda.max_memory_allocated() / 2**20)
            peak = self._hwm_mb() if self.resettable else None
            self.peaks[name] = sig(peak if peak is not None else self._ru_maxrss_mb())
            self.overall_mb = max(self.overall_mb, self._ru_maxrss_mb())

    def report(self) -> dict:
        self.overall_mb = max(self.overall_mb, self._ru_maxrss_mb())
        return {
            "peak_rss_mb": sig(self.overall_mb),
            "phase_peak_rss_mb": self.peaks,
            **({"phase_peak_cuda_allocated_mb": self.cuda_peaks} if self.cuda_peaks else {}),
            "children_peak_rss_mb": sig(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0),
            "method": ("per phase: VmHWM after resetting it (/proc/self/clear_refs 5) at the phase start"
                       if self.resettable else "per phase: ru_maxrss so far (cannot reset the peak here)")
                      + "; children: finished data-loader workers (ru_maxrss of RUSAGE_CHILDREN)",
        }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def attempt(errors: list[str], label: str, fn: Callable[[], dict]) -> dict | None:
    """``fn()``, or None with the error recorded: one failing figure must not lose the others (exit code 1)."""
    try:
        return fn()
    except Exception as err:
        errors.append(f"{label}: {type(err).__name__}: {err}")
        log(f"FAILED {label}:\n{traceback.format_exc()}")
        return None


def environment(threads: int) -> dict:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux
        pass
    model = model or platform.processor() or platform.machine()
    bf16 = native_bf16("cpu")
    import monai

    env = {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16,
        "cpu_bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        env["cuda_version"] = torch.version.cuda
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32  # the float32 reference convolutions use it
    return env
