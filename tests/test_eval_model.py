"""Smoke runs of every eval task end to end on the default model (tiny --limit, short answers)."""
import json
from pathlib import Path

import pytest

from localpers.cli.cli import main

DATA = Path(__file__).resolve().parent / "data"
METHODS = ["base", "prompt", "rag"]


def run_eval(tmp_path, *argv, methods=METHODS) -> dict:
    assert main(["eval", *argv, "--method", ",".join(methods), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text().count("\n| ") >= len(methods)
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["results"]) == methods and report["model"]
    return report


def test_upqa_smoke(tmp_path):
    report = run_eval(tmp_path, "upqa", "--limit", "1", "--max-tokens", "8")
    for method in METHODS:
        metrics = report["results"][method]
        assert set(metrics) == {"explicit_acc", "paraphrased_acc", "implicit_acc", "mc_acc", "locality_kl"}
        assert all(0 <= metrics[m] <= 1 for m in metrics if m.endswith("_acc"))
    # The prompt method's system message changes the distribution on neutral prompts; base is the reference.
    assert report["results"]["base"]["locality_kl"] == 0 < report["results"]["prompt"]["locality_kl"]
    assert len(report["items"]) == len(METHODS)
    assert all(isinstance(row["explicit"], str) and row["mc_choice"] for row in report["items"])


def test_prefeval_smoke(tmp_path):
    report = run_eval(tmp_path, "prefeval", "--limit", "2", "--turns", "0,1", methods=["base", "rag"])
    assert all(set(r) == {"followed@0", "followed@1"} for r in report["results"].values())
    rows = report["items"]
    assert len(rows) == 2 * 2 * 2
    # The option order is seeded per item and shared by every method and turn count.
    assert len({(r["id"], tuple(r["order"])) for r in rows}) == 2
    # rag walks the turn counts down (to reuse base's KV cache), but rows stay grouped by method, turns ascending.
    assert [(r["method"], r["turns"]) for r in rows if r["id"] == rows[0]["id"]] == \
        [("base", 0), ("base", 1), ("rag", 0), ("rag", 1)]
    assert (tmp_path / "followed_by_turns.png").is_file()


def test_prefeval_shards_merge_into_the_full_run(tmp_path):
    args = ("prefeval", "--limit", "3", "--turns", "0")
    full = run_eval(tmp_path / "full", *args, methods=["base"])
    for i in range(2):
        run_eval(tmp_path / f"s{i}", *args, "--shard", f"{i}/2", methods=["base"])
    assert main(["eval", "merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "report.json").read_text())
    assert merged["config"] == full["config"] and merged["inputs"] == full["inputs"]
    assert set(full["inputs"]) == {"model", "data", "distractors"}
    assert merged["results"]["base"] == pytest.approx(full["results"]["base"])
    assert sorted(merged["items"], key=lambda row: row["id"]) == sorted(full["items"], key=lambda row: row["id"])


def test_an_interrupted_run_resumes_to_the_same_report(tmp_path, monkeypatch, capsys):
    from localpers.eval import evaluation

    args = ("prefeval", "--limit", "3", "--turns", "0,1")
    full = run_eval(tmp_path / "full", *args, methods=["base", "prompt"])
    scored, best_option = [], evaluation.best_option

    def killed_on_the_ninth_call(*a, **k):  # 2 turn counts x 2 methods an item: dies in the third item
        if len(scored) == 8:
            raise KeyboardInterrupt
        scored.append(1)
        return best_option(*a, **k)

    monkeypatch.setattr(evaluation, "best_option", killed_on_the_ninth_call)
    assert main(["eval", *args, "--method", "base,prompt", "--out", str(tmp_path / "cut")]) == 130  # Ctrl-C
    assert "run the same command again to resume" in capsys.readouterr().err
    assert len((tmp_path / "cut" / "progress.jsonl").read_text().splitlines()) == 1 + 2 * 2  # the run, 2 items x 2 methods
    scored.clear()
    monkeypatch.setattr(evaluation, "best_option", lambda *a, **k: scored.append(1) or best_option(*a, **k))
    resumed = run_eval(tmp_path / "cut", *args, methods=["base", "prompt"])
    assert len(scored) == 2 * 2  # only the last item
    assert resumed["results"] == full["results"] and resumed["items"] == full["items"]
    assert not (tmp_path / "cut" / "progress.jsonl").exists()


@pytest.mark.parametrize("questions, metrics", [
    ("lamp2_dev_questions.json", {"accuracy"}),
    ("lamp3_dev_questions.json", {"accuracy", "mae", "rmse"}),
])
def test_lamp_classification_smoke(tmp_path, questions, metrics):
    report = run_eval(tmp_path, "lamp", "--data", str(DATA / questions))
    assert all(set(r) == metrics for r in report["results"].values())
    if "mae" in metrics:
        assert all(0 <= r["mae"] <= 4 for r in report["results"].values())


def test_longlamp_smoke_is_deterministic(tmp_path):
    args = ("longlamp", "--data", str(DATA / "longlamp_review_questions.json"), "--max-tokens", "12")
    first = run_eval(tmp_path / "a", *args, methods=["rag"])
    second = run_eval(tmp_path / "b", *args, methods=["rag"])
    assert first["results"] == second["results"] and first["items"] == second["items"]
    assert all(0 <= r["rouge1"] <= 1 and 0 <= r["rougeL"] <= 1 for r in first["results"].values())
    assert all(row["output"] for row in first["items"])


def test_world_smoke(tmp_path):
    report = run_eval(tmp_path, "world", "--users", "6", "--steps", "3", "--limit", "2", "--max-tokens", "6",
                      methods=["base", "rag"])
    assert {"explicit_acc", "mc_acc", "rouge1", "rougeL"} <= set(report["results"]["rag"])
    history = report["breakdown"]["rag"]["history"]
    assert sum(group["n"] for group in history.values()) == 2
    assert (tmp_path / "by_history.png").is_file() and (tmp_path / "by_step.png").is_file()
