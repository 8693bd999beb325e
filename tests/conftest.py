from pathlib import Path

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
