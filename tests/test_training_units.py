"""PerCE/CE training's parts one by one, fast (a tiny random model, one thread): the config's checks, LoRA's
init and placement, the examples and their tokens, the step order and log, the progress bar and checkpoint, the
zero-weight step, and the user-level entry points (train_user, the worker's jobs, the evaluation's cached adapter)
in process. The mutation shard of personalize/training.py runs these (test_training.py's slow oracle, DDP and CLI
cases stay outside it)."""
from __future__ import annotations

import io
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from localpers import names
from localpers.errors import UserError
from localpers.personalize import training
from localpers.personalize.training import (Encoded, Example, LoRALinear, TrainConfig, TrainResult, StepLog, add_lora,
                                            check_enough, encode, end_of_turn, example_order, export_lora,
                                            history_examples, instruction_pair, load_lora_state, lora_modules,
                                            lora_state, n_steps, remove_lora, retrieve_profile, train, use_bf16)
from tests.helpers_models import random_model_path
from tests.test_training import one_thread  # noqa: F401  (autouse there: one torch thread here too)

POST = "Hey all! Another weekend of bouldering at gym {i}, so cozy. Stay curious!"


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return random_model_path(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def model(llama_path):
    return training.torch_model(str(llama_path))  # the cached copy adapter_for_examples uses too


@pytest.fixture(scope="module")
def tok(llama_path):
    return training.tokenizer(str(llama_path))

def fast(**kw):
    return TrainConfig(**{"steps": 3, "batch": 2, "lr": 2e-2, "precision": "fp32", "rank": 4, **kw})


def random_encoded(vocab, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n):
        profile, x, y = (torch.randint(5, vocab, (k,), generator=g) for k in (10, 5, 6 + j))
        out.append(Encoded(torch.cat([profile, x, y]), torch.cat([x, y]), len(y)))
    return out


# ---------------------------------------------------------------- the config

@pytest.mark.parametrize("changed, message", [
    ({"objective": "sft"}, "unknown objective 'sft'"),
    ({"targets": ("q", "wq")}, r"unknown LoRA targets \['wq'\]"),
    ({"targets": ()}, "unknown LoRA targets"),
    ({"layers": 0}, "layers must be at least 1"),
    ({"rank": 0}, "rank, batch and steps must be at least 1"),
    ({"batch": 0}, "rank, batch and steps must be at least 1"),
    ({"steps": 0}, "rank, batch and steps must be at least 1"),
    ({"epochs": 0.0}, "epochs positive"),
    ({"precision": "fp16"}, "precision must be auto, bf16 or fp32, not 'fp16'"),
    ({"min_weight": 2.0, "max_weight": 1.0}, r"need min_weight <= max_weight"),
    ({"weights": "cached"}, "weights must be bootstrap or frozen, not 'cached'"),
    ({"normalize": "sum"}, "normalize must be tokens or weights, not 'sum'"),
    ({"normalize": "weights", "min_weight": None}, r"min_weight >= 0"),
    ({"normalize": "weights", "min_weight": -0.5}, r"min_weight >= 0"),
])
def test_invariant_each_bad_config_field_is_refused_with_its_own_message(changed, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**changed).check()


@pytest.mark.parametrize("changed", [
    {}, {"objective": names.CE}, {"targets": ("down",)}, {"layers": 1}, {"rank": 1, "batch": 1, "steps": 1},
    {"epochs": 0.01}, {"precision": "bf16"}, {"precision": "fp32"}, {"min_weight": 1.0, "max_weight": 1.0},
    {"min_weight": None, "max_weight": 0.5}, {"min_weight": 6.0, "max_weight": None}, {"weights": "frozen"},
    {"normalize": "weights", "min_weight": 0.0},
])
def test_invariant_every_valid_config_passes_its_check_unchanged(changed):
    config = TrainConfig(**changed)
    assert config.check() == config


def test_an_absent_clip_bound_is_infinite():
    assert TrainConfig().clip == (0.8, 5.0)
    assert TrainConfig(min_weight=None).clip == (-math.inf, 5.0)
    assert TrainConfig(max_weight=None).clip == (0.8, math.inf)
    assert TrainConfig(min_weight=None, max_weight=None).clip == (-math.inf, math.inf)


def test_bf16_is_the_configs_choice_or_the_cpus(monkeypatch):
    cpu = torch.device("cpu")
    for has in (True, False):
        monkeypatch.setattr(training, "cpu_has_bf16", lambda has=has: has)
        assert use_bf16(TrainConfig(precision="auto"), cpu) is has
        assert use_bf16(TrainConfig(precision="bf16"), cpu) is True
        assert use_bf16(TrainConfig(precision="fp32"), cpu) is False


@pytest.mark.parametrize("flags, has", [("fpu sse avx2", False), ("fpu avx512_bf16 avx2", True),
                                        ("fpu amx_bf16", True), (None, False)])
def test_cpu_bf16_comes_from_the_cpuinfo_flags(monkeypatch, flags, has):
    def fake_open(path, *a, **kw):
        assert path == "/proc/cpuinfo"
        if flags is None:
            raise OSError("no /proc")
        return io.StringIO(f"processor\t: 0\nmodel name\t: x avx512_bf16 in a name\nflags\t\t: {flags}\n")

    monkeypatch.setattr(training, "open", fake_open, raising=False)
    assert training.cpu_has_bf16() is has


# ---------------------------------------------------------------- LoRA

def test_invariant_lora_starts_as_the_base_layer_with_kaiming_uniform_a():
    base = torch.nn.Linear(64, 24, bias=False)
    layer = LoRALinear(base, rank=4, alpha=16.0, generator=torch.Generator().manual_seed(3))
    a, bound = layer.lora_a.detach(), 1 / math.sqrt(64)
    assert a.shape == (4, 64) and layer.lora_b.shape == (24, 4) and not layer.lora_b.any()
    assert a.min() >= -bound and a.max() <= bound  # uniform on [-1/sqrt(n_in), 1/sqrt(n_in)]
    assert a.min() < -0.8 * bound and a.max() > 0.8 * bound
    assert layer.scale == 4.0 and layer.weight is base.weight
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        layer.lora_b.normal_()
    torch.testing.assert_close(layer(x), base(x) + 4.0 * (x @ a.T) @ layer.lora_b.T)
    again = LoRALinear(base, rank=4, alpha=16.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.lora_a, layer.lora_a)  # seeded


def test_invariant_add_lora_wraps_the_targets_of_the_last_layers_only(model):
    n = len(model.layers)
    try:
        every = add_lora(model, ("q", "down"), rank=2)
        assert sorted(every) == sorted(f"blk.{i}.{t}" for i in range(n) for t in ("attn_q", "ffn_down"))
        assert all(m.lora_a.shape[0] == 2 for m in every.values())
        last = add_lora(model, ("q", "down"), rank=2, layers=1)  # replaces the first (remove_lora inside)
        assert sorted(last) == [f"blk.{n - 1}.attn_q", f"blk.{n - 1}.ffn_down"]
        assert sorted(lora_modules(model)) == sorted(last)
        assert sorted(add_lora(model, ("v",), layers=n + 5)) == [f"blk.{i}.attn_v" for i in range(n)]
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(name.endswith(("lora_a", "lora_b")) for name in trainable)
    finally:
        remove_lora(model)
    assert not lora_modules(model)
    assert isinstance(model.layers[0].attn.q, torch.nn.Linear)


def test_lora_state_round_trips(model):
    try:
        add_lora(model, ("k",), rank=2, seed=1)
        state = lora_state(model)
        assert sorted(state) == sorted(f"blk.{i}.attn_k.{p}" for i in range(len(model.layers)) for p in "ab")
        changed = {k: v + 1 for k, v in state.items()}
        load_lora_state(model, changed)
        assert all(torch.equal(v, changed[k]) for k, v in lora_state(model).items())
    finally:
        remove_lora(model)


def test_export_lora_writes_the_factors_of_the_models_arch(model, tmp_path):
    import gguf

    with pytest.raises(ValueError, match="no LoRA"):
        export_lora(model, tmp_path / "none.gguf", 16.0)
    try:
        add_lora(model, ("q",), rank=2, layers=1)
        path = export_lora(model, tmp_path / "sub" / "a.gguf", 8.0)
    finally:
        remove_lora(model)
    assert path == tmp_path / "sub" / "a.gguf" and [p.name for p in path.parent.iterdir()] == ["a.gguf"]
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == model.config.arch and fields["adapter.lora.alpha"] == 8.0
    n = len(model.layers)
    assert sorted(t.name for t in reader.tensors) == [f"blk.{n - 1}.attn_q.weight.lora_a",
                                                      f"blk.{n - 1}.attn_q.weight.lora_b"]


# ---------------------------------------------------------------- examples and tokens

def test_instruction_pairs_by_form_meta_and_kind():
    assert instruction_pair("  Q: Any pets? A: A dog.  ") == ("Any pets?", "A dog.")
    # only an item that opens with "Q:" and has an answer is a question/answer pair
    assert instruction_pair("Q: no answer given here") == (training.INSTRUCTIONS["post"], "Q: no answer given here")
    text = "Long day. A: the plan worked out fine for everyone involved in the end, more or less."
    assert instruction_pair(text, "post") == (training.INSTRUCTIONS["post"], text)
    assert instruction_pair("Loved it.", "review", {"input": " Review the blender. "}) == ("Review the blender.",
                                                                                         "Loved it.")
    assert instruction_pair("Loved it.", "post", {"input": "  "}) == (training.INSTRUCTIONS["post"], "Loved it.")
    assert instruction_pair("Loved it.", "post", {"title": " Weekend "}) == ('Write a short text titled "Weekend".',
                                                                          "Loved it.")
    assert instruction_pair("Loved it.", "review", {"summary": "Loud"})[0] == 'Write a short review titled "Loud".'
    assert instruction_pair("Loved it.", "post", {"title": "Loved it."})[0] == training.INSTRUCTIONS["post"]
    for kind in training.INSTRUCTIONS:
        assert instruction_pair("Some words of mine.", kind) == (training.INSTRUCTIONS[kind], "Some words of mine.")
    # an unknown kind is guessed from the text
    assert instruction_pair("Rating: 4/5, fine.", "tweet")[0] == training.INSTRUCTIONS["review"]
    assert instruction_pair("My review of the new place.")[0] == training.INSTRUCTIONS["review"]
    assert instruction_pair("I'm a night owl.")[0] == training.INSTRUCTIONS["preference"]
    assert instruction_pair("My cat sleeps all day.")[0] == training.INSTRUCTIONS["preference"]
    assert instruction_pair("I " + "really " * 12 + "like it.")[0] == training.INSTRUCTIONS["post"]
    assert instruction_pair("We went out.")[0] == training.INSTRUCTIONS["post"]


class Index:
    """A search index that ranks the given ids for every query."""

    def __init__(self, ranking):
        self.ranking, self.asked = ranking, []

    def search(self, query, k):
        self.asked.append(k)
        return [(i, 1.0) for i in self.ranking[:k]]


def test_invariant_a_profile_is_the_top_k_without_the_target_filled_up_with_the_most_recent():
    texts = {i: f"t{i}" for i in range(6)}
    order = list(range(6))
    assert retrieve_profile(Index([2, 4, 1]), order, texts, "q", exclude=4, k=2) == ["t2", "t1"]
    assert retrieve_profile(Index([3]), order, texts, "q", exclude=5, k=3) == ["t3", "t4", "t2"]
    assert retrieve_profile(Index([]), order, texts, "q", exclude=0, k=10) == ["t5", "t4", "t3", "t2", "t1"]
    assert retrieve_profile(Index([5, 4, 3]), order, texts, "q", exclude=1, k=0) == []


def test_history_examples_keep_items_of_at_least_four_words_and_their_ids():
    items = [{"id": 10 + i, "text": POST.format(i=i), "kind": "post"} for i in range(5)]
    items += [{"id": 90, "text": "just three words"}, {"id": 91, "text": "exactly four words here"},
              {"text": "an item without any id"}]
    examples = history_examples(items, k=2)
    assert [e.source for e in examples] == [10, 11, 12, 13, 14, 91, 6]
    assert examples[5].target == "exactly four words here" and examples[6].target == "an item without any id"
    for e in examples:
        assert len(e.profile) == 2 and e.target not in e.profile
    assert examples[0].prompt == training.INSTRUCTIONS["post"]
    assert history_examples([{"text": "one two three four"}], k=4)[0].profile == ()


def test_check_enough_needs_min_items():
    ok = [Example("x", "y")] * training.MIN_ITEMS
    check_enough(ok, "ann")
    with pytest.raises(UserError, match=rf"user 'ann' has {training.MIN_ITEMS - 1} item\(s\).*needs at least "
                                        rf"{training.MIN_ITEMS}.*localpers import --user ann"):
        check_enough(ok[1:], "ann")
    check_enough(ok[:3], "ann", needed=3)


def test_end_of_turn_is_what_the_template_writes_after_an_answer(tok):
    assert tok.eos_token == "</s>"
    assert end_of_turn(tok) == "<|im_end|>"  # ChatML's, not the vocabulary's eos
    no_marker = SimpleNamespace(eos_token="</s>", apply_chat_template=lambda messages, add_generation_prompt: "x")
    assert end_of_turn(no_marker) == "</s>"


def test_invariant_training_tokens_are_the_served_prompts_then_the_target(tok):
    from localpers.personalize.methods import rag_prefix

    example = Example("Write a short post.", "Hey all! Bouldering again.", ("Likes climbing a lot.", "Rainy."))
    e = encode(tok, example, TrainConfig())
    target = tok.encode("Hey all! Bouldering again.<|im_end|>", add_bos=False)
    served = lambda text: tok.chat_tokens([{"role": "user", "content": text}]).ids
    assert e.n_target == len(target)
    assert e.neg.tolist() == served("Write a short post.") + target
    assert e.pos.tolist() == served(rag_prefix(list(example.profile)) + "Write a short post.") + target
    short = encode(tok, example, TrainConfig(max_target_tokens=3, max_profile_chars=5), eot="<|im_end|>")
    assert short.n_target == 3 and short.pos[-3:].tolist() == target[:3]
    assert short.pos.tolist()[:-3] == served(rag_prefix(["Likes", "Rainy"]) + "Write a short post.")


# ---------------------------------------------------------------- the step order and the trainer

def test_invariant_steps_take_batch_examples_from_successive_seeded_permutations():
    order = example_order(5, steps=4, batch=3, seed=1)
    assert len(order) == 4 and all(len(b) == 3 for b in order)
    stream = [i for b in order for i in b]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    assert order == example_order(5, steps=4, batch=3, seed=1) != example_order(5, steps=4, batch=3, seed=2)
    assert n_steps(TrainConfig(steps=7), 100) == 7
    assert n_steps(TrainConfig(batch=4), 10) == 3 and n_steps(TrainConfig(batch=4, epochs=2.5), 10) == 7
    assert n_steps(TrainConfig(batch=4, epochs=0.01), 10) == 1


def test_summary_reports_the_first_and_last_loss_and_the_token_weighted_mean_weight():
    result = TrainResult(steps=[StepLog(1, 2.123456, 2.0, 1.0, 10, 0.1), StepLog(2, 1.5, 1.4, 3.0, 30, 0.1)],
                         tokens=40, seconds=1.234, cpu_seconds=0.987)
    assert result.summary() == {"steps": 2, "tokens": 40, "seconds": 1.23, "cpu_seconds": 0.99,
                                "first_loss": 2.1235, "last_loss": 1.5, "mean_weight": 2.5}
    assert TrainResult().summary() == {"steps": 0, "tokens": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                                       "first_loss": None, "last_loss": None, "mean_weight": None}


def test_invariant_the_step_log_numbers_steps_and_counts_each_batchs_target_tokens(model, capfd):
    data = random_encoded(model.config.vocab_size)
    config = fast(steps=3)
    result = train(model, data, config, progress=False)
    remove_lora(model)
    order = example_order(len(data), 3, config.batch, config.seed)
    assert [s.step for s in result.steps] == [1, 2, 3]
    assert [s.tokens for s in result.steps] == [sum(data[i].n_target for i in b) for b in order]
    assert result.tokens == sum(s.tokens for s in result.steps) and result.resumed_from == 0
    assert all(s.loss > 0 and s.nll > 0 and s.seconds >= 0 for s in result.steps)
    assert "training" not in capfd.readouterr().err  # progress=False: no bar
    train(model, data, config, progress=True)
    remove_lora(model)
    err = capfd.readouterr().err
    assert "perce training" in err and "3/3" in err


def test_invariant_the_checkpoint_holds_the_last_step_and_a_rerun_resumes_from_it(model, tmp_path):
    data = random_encoded(model.config.vocab_size)
    ckpt = tmp_path / "run.ckpt"
    first = train(model, data, fast(steps=3), checkpoint=ckpt, checkpoint_every=2, progress=False)
    state = lora_state(model)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"] == 3 and [s["loss"] for s in saved["log"]] == [s.loss for s in first.steps]
    assert not list(tmp_path.glob("*.tmp"))
    again = train(model, data, fast(steps=3), checkpoint=ckpt, progress=False)
    assert again.resumed_from == 3 and [s.loss for s in again.steps] == [s.loss for s in first.steps]
    assert all(torch.equal(state[k], v) for k, v in lora_state(model).items())
    remove_lora(model)


def test_invariant_a_step_whose_weights_are_all_zero_changes_nothing(model):
    """normalize="weights" with every w_t = 0 (clip range [0, 0]): the step's loss is 0 and the LoRA stays at
    its init (no division by the zero weight sum)."""
    data = random_encoded(model.config.vocab_size)
    config = fast(steps=2, min_weight=0.0, max_weight=0.0, normalize="weights")
    result = train(model, data, config, progress=False)
    trained = lora_state(model)
    add_lora(model, config.targets, config.rank, config.alpha, config.seed, config.layers)
    init = lora_state(model)
    remove_lora(model)
    assert all(s.loss == 0.0 and s.mean_weight == 0.0 and s.nll > 0 for s in result.steps)
    assert all(torch.equal(trained[k], v) for k, v in init.items())


def test_invariant_frozen_weights_are_the_clipped_initial_pir(model):
    data = random_encoded(model.config.vocab_size)
    config = fast(steps=3, weights="frozen")
    result = train(model, data, config, collect_pir=True, progress=False)
    remove_lora(model)
    start = 0
    for s in result.steps:
        pir = torch.tensor(result.pir[start:start + s.tokens])
        start += s.tokens
        assert s.mean_weight == pytest.approx(float(pir.clamp(0.8, 5.0).mean()), rel=1e-5)
    assert (torch.tensor(result.pir) < 0.8).any()  # the lower bound acted


# ---------------------------------------------------------------- a user's adapter

def test_invariant_adapter_for_examples_trains_the_configs_run_and_resumes_from_its_checkpoint(tmp_path, llama_path,
                                                                                              capfd):
    examples = [Example(f"Write post {i}.", POST.format(i=i), ("Likes climbing.",), i) for i in range(6)]
    config = fast(steps=2, max_examples=4, targets=("down",))
    ckpt = tmp_path / "perce.ckpt"
    path, result = training.adapter_for_examples(llama_path, examples, config, tmp_path / "a.gguf", checkpoint=ckpt,
                                                 progress=False)
    assert path == tmp_path / "a.gguf" and path.is_file() and "training" not in capfd.readouterr().err
    assert [s.step for s in result.steps] == [1, 2] and result.resumed_from == 0
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"] == 2 and all(".ffn_down." in k for k in saved["lora"])
    # the same run again resumes from the checkpoint: nothing left to train
    _, again = training.adapter_for_examples(llama_path, examples, config, tmp_path / "b.gguf", checkpoint=ckpt,
                                             progress=False)
    assert again.resumed_from == 2 and [s.loss for s in again.steps] == [s.loss for s in result.steps]
    # max_examples keeps the most recent examples: another data set (the first two left out) than all six
    _, six = training.adapter_for_examples(llama_path, examples, replace(config, max_examples=None),
                                           tmp_path / "c.gguf", checkpoint=ckpt, progress=False)
    assert six.resumed_from == 0
    assert not lora_modules(training.torch_model(str(llama_path)))


def make_user(store, n=9):
    ids = [store.add("ann", POST.format(i=i), kind="post") for i in range(n)]
    store.add("ann", "too short", kind="post")
    return ids


def test_invariant_train_user_registers_the_adapter_for_the_served_model_with_its_sources(tmp_path, llama_path,
                                                                                         capfd):
    import gguf

    from localpers.engine.engine import model_sha256
    from localpers.store.store import Store

    with Store.open(tmp_path / "d") as store:
        ids = make_user(store)
        out = training.train_user(store, "ann", SimpleNamespace(model_path=str(llama_path)), names.CE,
                                  config=fast(steps=2, objective=names.PERCE))
        (artifact,) = store.artifacts("ann", names.LORA)
        folder = store.artifact_dir("ann")
    assert "training" not in capfd.readouterr().err
    assert out["method"] == names.CE and out["sources"] == ids and out["steps"] == 2
    assert out["version"] == artifact["id"] and out["path"] == artifact["path"]
    assert out["config"] == {k: v for k, v in vars(fast(steps=2)).items() if k != "objective"}
    assert artifact["meta"]["method"] == names.CE and artifact["sources"] == ids
    assert artifact["base_model_sha256"] == model_sha256(llama_path)
    assert not list(folder.glob("*.ckpt")) and not list(folder.glob("*.tmp"))
    reader = gguf.GGUFReader(artifact["path"])
    assert reader.fields["general.architecture"].contents() == "llama" and len(reader.tensors) > 0
    assert not lora_modules(training.torch_model(str(llama_path)))  # the cached model is the base model again


@pytest.mark.parametrize("job", [training.perce_job, training.ce_job])
def test_invariant_a_training_job_uses_the_job_config_and_registers_only_while_it_runs(job, tmp_path, llama_path):
    from localpers.store.store import StaleError
    from localpers.store.store import Store

    objective = job.__name__.removesuffix("_job")
    with Store.open(tmp_path) as store:
        ids = make_user(store)
        queued = store.queue_job("ann", objective)
        assert store.claim_job()["id"] == queued["id"]
        result = job(store, "ann", SimpleNamespace(model_path=str(llama_path)), queued["id"])
        (artifact,) = store.artifacts("ann", names.LORA)
        assert result == {"artifact": artifact["id"], "sources": len(ids), "steps": training.JOB_CONFIG.steps,
                          "tokens": artifact["meta"]["tokens"]}
        assert artifact["meta"]["method"] == objective and artifact["meta"]["config"]["layers"] == 10
        store.finish_job(queued["id"], names.DONE)
        stale = store.queue_job("ann", objective)  # queued, never claimed: not running
        with pytest.raises(StaleError):
            job(store, "ann", SimpleNamespace(model_path=str(llama_path)), stale["id"])
        assert [a["id"] for a in store.artifacts("ann", names.LORA)] == [artifact["id"]]
    assert job.__name__ == f"{objective}_job" and "JOB_CONFIG" in job.__doc__


def test_invariant_an_evaluation_users_adapter_is_trained_once_per_history(tmp_path, llama_path, monkeypatch):
    import json

    from localpers.personalize.methods import User

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engine = SimpleNamespace(model_path=str(llama_path))
    history = tuple(POST.format(i=i) for i in range(training.MIN_ITEMS))
    config = fast(steps=2)
    path = training.user_adapter(User("v", history=history), engine, names.CE, config)
    assert path.parent == tmp_path / "localpers" / "perce" and path.name.startswith("ce-") and path.is_file()
    assert json.loads(path.with_suffix(".json").read_text())["user"] == "v"
    assert json.loads(path.with_suffix(".json").read_text())["steps"] == 2

    def no_training(*a, **kw):
        raise AssertionError("trained again")

    with monkeypatch.context() as m:
        m.setattr(training, "adapter_for_examples", no_training)
        assert training.user_adapter(User("v", history=history), engine, names.CE, config) == path
    named = training.user_adapter(User("v", history=history), engine, names.PERCE, config, name="perce-x")
    assert named.name.startswith("perce-x-") and named != path
    assert training.user_adapter(User("v", history=history[:-1]), engine, names.CE, config) is None


def test_the_evaluation_methods_are_named_after_their_method():
    assert training.perce_method.__name__ == "perce_method" and training.ce_method.__name__ == "ce_method"
    assert [m.__name__ for m in (training.perce_clip05, training.perce_noclip, training.perce_frozen,
                                 training.perce_wnorm)] == [f"{n.replace('-', '_')}_method"
                                                            for n in names.PERCE_ABLATIONS]
    assert "perce LoRA adapter" in training.perce_frozen.__doc__ and "frozen" in training.perce_frozen.__doc__


def test_invariant_a_served_user_gets_only_the_adapter_registered_for_the_method():
    from localpers.personalize.methods import Personalized, RegisteredArtifact, User

    served = User("u", registered=(RegisteredArtifact(names.CE, names.LORA, "/a/ce.gguf"),
                                   RegisteredArtifact(names.PERCE, names.CONTROL_VECTOR, "/a/cv.gguf")))
    assert training.ce_method(served, "q", None).artifacts.lora == (("/a/ce.gguf", 1.0),)
    assert training.perce_method(served, "q", None) == Personalized()  # a perce control vector is no LoRA
    assert training.perce_clip05(replace(served, registered=(RegisteredArtifact(names.PERCE, names.LORA, "/p"),)),
                                 "q", None) == Personalized()
