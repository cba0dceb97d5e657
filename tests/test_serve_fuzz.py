"""A bounded schemathesis run against a live server (a tiny random-weight model with a Qwen3-like template that
supports tools and raises on a conversation without a user message): every operation of /openapi.json, with
requests generated from the schema and deliberately invalid ones; no 5xx, and every response matches the schema
(issue #13). Deterministic (derandomized), about a minute on 2 cores."""
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from helpers_models import VOCAB
from serve_helpers import live_server
from test_serve_process import QWEN3_LIKE


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    from localpers.engine.engine import Engine
    from localpers.model.gguf_write import random_model
    from localpers.serve.server import create_app

    vocab = VOCAB / "ggml-vocab-llama-spm.gguf"
    path = random_model(tmp_path_factory.mktemp("fuzz") / "tiny.gguf", "llama", vocab, n_layer=2, seed=5,
                        chat_template=QWEN3_LIKE)
    return create_app(engine=Engine(path, n_ctx=128, n_threads=1), data_dir=str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def fuzz_url(fuzz_app):
    with live_server(fuzz_app) as url:
        yield url


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app):
    return schemathesis.openapi.from_dict(fuzz_app.openapi())


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_responses_match_the_schema(case, fuzz_url):
    case.call_and_validate(base_url=fuzz_url, timeout=60,
                           checks=[not_a_server_error, response_schema_conformance, content_type_conformance])
