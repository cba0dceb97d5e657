from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared fixtures and data (../shared beside the checkout)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: shared fixtures and data are needed for this test")
    return SHARED


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    import localpers

    return localpers.default_model_path()
