from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


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
