import contextlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session", autouse=True)
def openvino_cache_dir(tmp_path_factory) -> Path:
    """One OpenVINO model cache for the whole test run (subprocesses inherit it through the environment): tests
    that make the same model share it, and nothing is written into the user's own cache."""
    root = tmp_path_factory.mktemp("nucleiseg_cache")
    previous = os.environ.get("NUCLEISEG_CACHE_DIR")
    os.environ["NUCLEISEG_CACHE_DIR"] = str(root)
    yield root / "openvino"
    if previous is None:
        os.environ.pop("NUCLEISEG_CACHE_DIR", None)
    else:
        os.environ["NUCLEISEG_CACHE_DIR"] = previous


class Registry(types.ModuleType):
    """Windows' ``winreg`` with one key, HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem, holding ``values``
    (None: the key cannot be opened)."""

    HKEY_LOCAL_MACHINE = 0x80000002

    def __init__(self):
        super().__init__("winreg")
        self.values: dict | None = {}

    def OpenKey(self, key, sub_key):
        if self.values is None or (key, sub_key) != (self.HKEY_LOCAL_MACHINE,
                                                     r"SYSTEM\CurrentControlSet\Control\FileSystem"):
            raise PermissionError(13, "Access is denied")
        return contextlib.nullcontext(sub_key)

    def QueryValueEx(self, key, name):
        if name not in self.values:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return self.values[name], 4  # REG_DWORD


@pytest.fixture
def windows(monkeypatch) -> Registry:
    """This process as ``path_limit`` sees Windows without long paths enabled (the default): sys.platform win32 and
    a registry whose FileSystem key holds no LongPathsEnabled value until the test sets one."""
    registry = Registry()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "winreg", registry)
    return registry


@pytest.fixture(scope="session")
def cryonuseg_dir() -> Path:
    """The real CryoNuSeg copy beside the checkout; tests that need it skip where it is absent."""
    path = SHARED / "cryonuseg"
    if not (path / "tissue images").is_dir():
        pytest.skip(f"CryoNuSeg not found at {path}")
    return path


@pytest.fixture(scope="session")
def observers_dir() -> Path:
    path = SHARED / "cryonuseg_observers"
    if not path.is_dir():
        pytest.skip(f"CryoNuSeg observer annotations not found at {path}")
    return path


def hand_built_labels() -> np.ndarray:
    """Hand-built map: a rectangle (id 3), an L (id 7), a disk (id 10), a single pixel (id 12)."""
    lab = np.zeros((60, 80), np.uint32)
    lab[5:15, 10:30] = 3
    lab[30:50, 5:10] = 7
    lab[45:50, 5:25] = 7
    yy, xx = np.mgrid[:60, :80]
    lab[(yy - 30) ** 2 + (xx - 55) ** 2 <= 64] = 10
    lab[2, 70] = 12
    return lab


def rings_and_pieces_labels() -> np.ndarray:
    """Hand-built map of nuclei with more than one ring beside ordinary ones: a ring (id 4, a 5 x 5 hole) around a
    single pixel (id 5); two pieces, the larger with a one-pixel hole (id 6); a square with a gap that meets the
    outside only at a corner (id 8); two squares meeting only at a corner (id 9); two touching rectangles (2, 3)."""
    lab = np.zeros((16, 24), np.uint32)
    lab[1:8, 1:8] = 4
    lab[2:7, 2:7] = 0
    lab[4, 4] = 5
    lab[1:4, 10:13] = 6
    lab[5:10, 10:15] = 6
    lab[7, 12] = 0
    lab[1:5, 17:21] = 8
    lab[3, 19] = lab[4, 20] = 0
    lab[11:13, 1:3] = 9
    lab[13:15, 3:5] = 9
    lab[11:14, 8:14] = 2
    lab[11:14, 14:17] = 3
    return lab


def inside_polygons(polygons, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether each point (x, y) is inside polygons given as lists of closed rings (exterior, then holes): inside an
    exterior and outside all its holes, by the even-odd rule (a ray towards +x crossing an odd number of edges)."""

    def odd(ring):
        ring = np.asarray(ring, np.float64)
        x1, y1, x2, y2 = ring[:-1, 0], ring[:-1, 1], ring[1:, 0], ring[1:, 1]
        px, py = x[..., None], y[..., None]
        spans = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        return (spans & (px < at)).sum(-1) % 2 == 1

    found = np.zeros(np.shape(x), bool)
    for exterior, *holes in polygons:
        found |= odd(exterior) & ~np.any([odd(h) for h in holes] or [np.zeros(np.shape(x), bool)], axis=0)
    return found


def bundle_outputs(bundle: Path) -> int:
    """The network outputs a bundle's train.json declares (3 classes, or 4 with the distance map)."""
    import json

    return json.loads((bundle / "configs" / "train.json").read_text())["network_def"]["out_channels"]


def saved_random_unet(path: Path, out_channels: int, features):
    """A UNet with random weights and random batch-norm statistics (so eval mode is not an identity), saved as a
    plain state dict at ``path``; returned in eval mode."""
    import torch

    from nucleiseg_monai.networks import UNet

    torch.manual_seed(0)
    net = UNet(out_channels=out_channels, features=features)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.eval()


def same_up_to_ids(a: np.ndarray, b: np.ndarray) -> bool:
    """Same background and a one-to-one map between the ids of a and b: the same nuclei, pixel for pixel."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)  # (id in a, id in b) of every labelled pixel
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
