from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Everything the tests read is in the repository: real vocabularies under tests/fixtures/vocab (llama.cpp's,
# MIT), development data under localpers/data (CC BY-NC 4.0, shipped with the package); nothing outside the repository.


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    import localpers

    return localpers.default_model_path()
