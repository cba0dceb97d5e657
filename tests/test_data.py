"""A clone alone is enough: the data the tests and `localpers eval`'s defaults read is in the repository, with
its licenses, and the development data is declared as package data so that a pip-installed localpers has it."""
import tomllib
from pathlib import Path

from localpers.personalize.datasets import DATA_DIR, DATA_FILES, data_path, read_inter_turns, read_prefeval_mcq, read_upqa

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_data_file_is_package_data_and_licensed():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["localpers"]
    package = REPO / "localpers"
    declared = {p for pattern in patterns for p in package.glob(pattern) if p.is_file() and DATA_DIR in p.parents}
    shipped = {p for p in DATA_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped == declared and DATA_DIR / "LICENSE.CC-BY-NC-4.0" in shipped and DATA_DIR / "README.md" in shipped
    for name in DATA_FILES:  # every named file is there and documented
        assert data_path(name).exists() and DATA_FILES[name].split("/")[-1] in (DATA_DIR / "README.md").read_text()
    assert "Evaluation data" in (REPO / "docs" / "eval.md").read_text() and "docs/eval.md" in (REPO / "README.md").read_text()


def test_the_default_eval_data_reads():
    assert len(read_upqa(data_path("upqa"))) == 100
    assert len(read_prefeval_mcq(data_path("prefeval"))) == 505
    assert len(read_inter_turns(data_path("inter_turns"))) == 24


def test_vocabulary_fixtures_have_their_license_and_tests_do_not_read_shared():
    vocab = REPO / "tests" / "fixtures" / "vocab"
    assert (vocab / "LICENSE.llama.cpp").read_text().startswith("MIT License")
    for name in ("llama-spm", "phi-3", "gpt-2", "deepseek-llm"):
        assert all((vocab / f"ggml-vocab-{name}.gguf{ext}").is_file() for ext in ("", ".inp", ".out"))
    for source in [*(REPO / "tests").glob("*.py"), *(REPO / "localpers").rglob("*.py"), *(REPO / "bench").glob("*.py")]:
        text = source.read_text() if source != Path(__file__) else ""
        assert '"shared"' not in text and "../shared" not in text, f"{source} reads ../shared"
