from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Everything the tests read is in the repository: real vocabularies under tests/fixtures/vocab (llama.cpp's,
# MIT), development data under localpers/data (CC BY-NC 4.0, shipped with the package); nothing outside the repository.


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    import localpers

    return localpers.default_model_path()


@pytest.fixture
def memory_client(tmp_path, monkeypatch):
    """A TestClient of a small app that mounts the memory router (localpers.serve.memory_api) the way `localpers
    serve` does, over a fresh store in tmp_path (key file, no passphrase)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from localpers.serve.memory_api import router
    from localpers.store.store import Store

    monkeypatch.delenv("LOCALPERS_PASSPHRASE", raising=False)
    app = FastAPI()
    app.include_router(router)
    with Store.open(tmp_path) as store:
        app.state.store = store
        with TestClient(app) as client:
            yield client
