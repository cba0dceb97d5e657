"""PerCE/CE LoRA training: the adapter llama.cpp serves computes what the trained torch model computes; the
trainer is deterministic, resumes exactly, splits batches without changing the result (accumulation, DDP),
and PerCE with the clip range [1, 1] is CE."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from localpers import names
from localpers.errors import UserError
from localpers.model.model import load_model
from localpers.personalize.training import (Encoded, TrainConfig, add_lora, example_order, export_lora, history_examples,
                                instruction_pair, lora_state, remove_lora, train)
from tests.helpers_models import ORACLE_TOL, TEXT, llama_cpp_logits, logit_error, random_model_path

REPO = Path(__file__).resolve().parents[1]
TOL = 2e-4  # as test_gguf_write.py's LoRA round trip (F32 model and KV cache: only summation order differs)


def random_encoded(n=6, seed=0, vocab=1000):
    """Token sequences with a shared target tail: pos = profile + x + y, neg = x + y."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        profile, x, y = (torch.randint(5, vocab, (k,), generator=g) for k in (12, 6, 10))
        out.append(Encoded(torch.cat([profile, x, y]), torch.cat([x, y]), len(y)))
    return out


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return random_model_path(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def llama_model(llama_path):
    return load_model(llama_path)  # train() adds a fresh LoRA each time and the tests remove it


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is 30x faster than two fighting over busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fast(**kw):
    return TrainConfig(**{"steps": 4, "batch": 2, "lr": 2e-2, "precision": "fp32", "rank": 4, **kw})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_trained_adapter_on_llama_cpp_equals_torch(arch, tmp_path_factory, tmp_path):
    """Oracle: the trained LoRA (q/k rows in GGUF order, llama.cpp's alpha/r) changes llama.cpp's logits
    exactly as it changes the torch model's."""
    from localpers.engine.tokenizer import Tokenizer

    path = random_model_path(tmp_path_factory, arch)
    tokens = Tokenizer.from_gguf(path).encode(TEXT, add_bos=True)
    model = load_model(path)
    vocab = model.config.vocab_size
    train(model, random_encoded(vocab=vocab), fast(steps=6, lr=5e-2), progress=False)
    adapter = export_lora(model, tmp_path / "perce.gguf", fast().alpha)
    with torch.no_grad():
        trained = model(torch.tensor([tokens]))[0].numpy()
    base = llama_cpp_logits(path, tokens)
    served = llama_cpp_logits(path, tokens, lora=adapter)
    assert logit_error(served, base) > 100 * TOL  # training really moved the model
    assert logit_error(trained, served) < ORACLE_TOL[arch]


def test_training_is_deterministic_and_resumes_exactly(llama_model, tmp_path):
    model = llama_model
    data = random_encoded(vocab=model.config.vocab_size)
    config = fast(steps=4)
    first = train(model, data, config, progress=False)
    state = lora_state(model)
    train(model, data, config, progress=False)
    assert all(torch.equal(state[k], v) for k, v in lora_state(model).items())

    class Crash(Exception):
        pass

    def crash_at_3(entry):
        if entry.step == 3:
            raise Crash

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        train(model, data, config, checkpoint=ckpt, checkpoint_every=2, progress=False, on_step=crash_at_3)
    resumed = train(model, data, config, checkpoint=ckpt, checkpoint_every=2, progress=False)
    assert resumed.resumed_from == 2
    assert [s.loss for s in resumed.steps] == [s.loss for s in first.steps]
    assert all(torch.equal(state[k], v) for k, v in lora_state(model).items())
    remove_lora(model)
    # another config does not resume from that checkpoint
    other = train(model, data, replace(config, lr=1e-3), checkpoint=ckpt, progress=False)
    assert other.resumed_from == 0


def test_perce_with_unit_clip_range_is_ce(llama_model):
    model = llama_model
    data = random_encoded(vocab=model.config.vocab_size)
    ce = train(model, data, fast(objective=names.CE), progress=False)
    ce_state = lora_state(model)
    perce = train(model, data, fast(objective=names.PERCE, min_weight=1.0, max_weight=1.0), progress=False)
    assert [s.loss for s in perce.steps] == pytest.approx([s.loss for s in ce.steps], rel=1e-6, abs=1e-7)
    for k, v in lora_state(model).items():
        torch.testing.assert_close(v, ce_state[k], rtol=1e-5, atol=1e-6)
    # with the paper's clip range the weights differ from 1 and so does the result
    weighted = train(model, data, fast(objective=names.PERCE), collect_pir=True, progress=False)
    assert any(abs(s.mean_weight - 1) > 1e-3 for s in weighted.steps)
    assert len(weighted.pir) == sum(s.tokens for s in weighted.steps)


def test_accumulated_gradients_are_those_of_the_union_batch(llama_model):
    """Examples backpropagated one by one (weights n_i / n_total) give the gradient of the token-level mean
    PerCE loss over the whole batch, computed at once by the plain-torch reference with full logits."""
    from localpers.kernels.reference import perce_linear_cross_entropy_reference
    from localpers.personalize.training import accumulate_gradients, lora_modules

    model = llama_model
    data = random_encoded(n=4, vocab=model.config.vocab_size)
    config = fast(objective=names.PERCE)
    add_lora(model, config.targets, config.rank, config.alpha, config.seed)
    generator = torch.Generator().manual_seed(1)
    for m in lora_modules(model).values():  # a nonzero B, so both factors get gradients
        torch.nn.init.normal_(m.lora_b, std=0.05, generator=generator)
    params = [p for p in model.parameters() if p.requires_grad]
    n_total = sum(e.n_target for e in data)
    accumulate_gradients(model, model.hidden, data, n_total, config)
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    rows = [(model.hidden(e.pos[None])[0, -e.n_target - 1:-1], model.hidden(e.neg[None])[0, -e.n_target - 1:-1],
             e.pos[-e.n_target:]) for e in data]
    loss, weights, _ = perce_linear_cross_entropy_reference(
        torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]).detach(), model.output.weight,
        torch.cat([r[2] for r in rows]))
    loss.backward()
    assert (weights != 1).any()
    remove_lora(model)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-5 * float(p.grad.abs().max()))


@pytest.mark.parametrize("objective", [names.PERCE, names.CE])
def test_bf16_loss_curve_follows_fp32(llama_model, objective):
    """bf16 autocast (fp32 master weights; the loss's GEMMs in bf16, its softmax and sums in fp32) tracks the fp32
    loss curve within 2% per step; the loss takes its bf16 path exactly when training is in bf16, and the logged
    NLL is the loss's own (all weights 1 for CE)."""
    from unittest import mock

    from localpers.kernels import perce_loss

    model = llama_model
    data = random_encoded(vocab=model.config.vocab_size)
    runs = {}
    for precision in ("fp32", "bf16"):
        seen = []
        with mock.patch.object(perce_loss, "compute_dtype",
                               side_effect=lambda *a, real=perce_loss.compute_dtype: seen.append(real(*a)) or seen[-1]):
            runs[precision] = train(model, data, fast(steps=6, objective=objective, precision=precision),
                                    progress=False)
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}, precision
    assert all(p.requires_grad is False or p.dtype == torch.float32 for p in model.parameters())
    for a, b in zip(runs["fp32"].steps, runs["bf16"].steps):
        assert abs(a.loss - b.loss) <= 0.02 * a.loss
        if objective == names.CE:
            assert a.nll == pytest.approx(a.loss, rel=1e-6) and b.nll == pytest.approx(b.loss, rel=1e-6)


def test_profile_never_holds_the_target_item():
    items = [{"id": i, "text": f"Hey all! Spent the afternoon on climbing number {i} again. Stay curious!", "kind": "post"}
             for i in range(10)]
    examples = history_examples(items, k=4)
    assert len(examples) == 10
    for e, item in zip(examples, items):
        assert item["text"] not in e.profile and len(e.profile) == 4 and e.target == item["text"]
        assert e.source == item["id"]


def test_instruction_pairs():
    assert instruction_pair("Q: Any pets at home? A: Definitely a dog.") == ("Any pets at home?", "Definitely a dog.")
    assert instruction_pair("Great blender, loud.", "review", {"summary": "Loud but strong"})[0] == \
        'Write a short review titled "Loud but strong".'
    assert instruction_pair("Honest review: the ramen was unreal. Peace out.")[0] == "Write a short review."


def test_train_user_needs_enough_writing(tmp_path, llama_path):
    from localpers.store.store import Store
    from localpers.personalize.training import train_user

    with Store.open(tmp_path) as store:
        store.add("bob", "Hey all! Tacos again tonight with friends, unreal. Peace out.", kind="post")
        with pytest.raises(UserError, match="needs at least 8"):
            train_user(store, "bob", llama_path, names.PERCE)
        assert store.artifacts("bob") == []


def test_personalize_perce_registers_the_adapter(tmp_path, llama_path):
    """`localpers personalize --method perce` on an imported history: one registered lora with its sources."""
    from localpers.store.store import Store

    history = tmp_path / "history.jsonl"
    lines = [{"text": f"Hey all! Another weekend of bouldering at gym {i}, so cozy. Stay curious!", "kind": "post"}
             for i in range(9)]
    history.write_text("\n".join(json.dumps(x) for x in lines))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "localpers", *a, "--data-dir", str(tmp_path / "d")],
                                    cwd=REPO, env=env, capture_output=True, text=True)
    assert run("import", "--user", "ann", str(history)).returncode == 0
    out = run("personalize", "--user", "ann", "--method", "perce", "--model", str(llama_path))
    assert out.returncode == 0, out.stderr
    assert f"localpers serve --model {llama_path} --personalize perce+rag" in out.stdout  # how to serve it
    with Store.open(tmp_path / "d") as store:
        (artifact,) = store.artifacts("ann", names.LORA)
        ids = [i["id"] for i in store.items("ann")]
    assert artifact["meta"]["method"] == names.PERCE and artifact["sources"] == ids
    assert Path(artifact["path"]).is_file()
    missing = run("personalize", "--user", "nobody", "--method", "ce", "--model", str(llama_path))
    assert missing.returncode == 2 and "no user 'nobody'" in missing.stderr


def test_ddp_two_processes_match_one(tmp_path, llama_path):
    """2-process gloo DDP: both ranks end with identical weights, equal to one process on the union batch."""
    import torch.multiprocessing as mp

    from localpers.cli.train_cli import _free_port, run_rank

    questions = [{"id": str(i), "input": f"Write a short post about topic {i}.",
                  "profile": [{"id": f"{i}-{j}", "text": f"Hey all! Topic {i} note {j} was unreal. Peace out."}
                              for j in range(5)]} for i in range(8)]
    outputs = {"task": "LongLaMP_test", "golds": [{"id": str(i), "output": f"Hey all! Topic {i} was lovely. Peace out."}
                                                  for i in range(8)]}
    (tmp_path / "q_questions.json").write_text(json.dumps(questions))
    (tmp_path / "q_outputs.json").write_text(json.dumps(outputs))
    config = fast(steps=3, batch=4, targets=("q", "v", "down"))
    from dataclasses import asdict

    job = dict(model=str(llama_path), data=str(tmp_path / "q_questions.json"), outputs=None, limit=None,
               out=str(tmp_path / "ddp.gguf"), config=asdict(config), threads=1, checkpoint=None, log=None,
               state_out=str(tmp_path / "ddp-%d.pt"))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    mp.spawn(run_rank, args=(2, job), nprocs=2, join=True)
    run_rank(0, 1, {**job, "out": str(tmp_path / "one.gguf"), "state_out": str(tmp_path / "one-%d.pt")})
    r0, r1, one = (torch.load(tmp_path / f, weights_only=True) for f in ("ddp-0.pt", "ddp-1.pt", "one-0.pt"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(r0[k].abs().max() > 0 for k in r0 if k.endswith(".b"))
    for k in r0:
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ddp.gguf").is_file()


def test_train_cli_checks_its_input_before_training(tmp_path, llama_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "localpers", "train", "--model", str(llama_path),
                                     "--out", str(tmp_path / "a.gguf"), *a], cwd=REPO, env=env, capture_output=True,
                                    text=True)
    (tmp_path / "x_questions.json").write_text(json.dumps([{"id": "1", "input": "Write.", "profile": []}]))
    missing_gold = run("--data", str(tmp_path / "x_questions.json"))
    assert missing_gold.returncode == 2 and "no gold output" in missing_gold.stderr
    (tmp_path / "x_outputs.json").write_text(json.dumps({"task": "t", "golds": [{"id": "1", "output": "Hi."}]}))
    uneven = run("--data", str(tmp_path / "x_questions.json"), "--batch", "3", "--nproc", "2")
    assert uneven.returncode == 2 and "multiple of --nproc" in uneven.stderr
    bad_target = run("--data", str(tmp_path / "x_questions.json"), "--targets", "q,wq")
    assert bad_target.returncode == 2 and "unknown LoRA targets" in bad_target.stderr
    bad_clip = run("--data", str(tmp_path / "x_questions.json"), "--clip", "5,0.8")
    assert bad_clip.returncode == 2 and "--clip 5,0.8: MIN must not exceed MAX" in bad_clip.stderr
    assert not (tmp_path / "a.gguf").exists()


def test_served_users_get_their_registered_adapter_and_nothing_is_trained():
    from localpers.personalize.methods import Personalized, RegisteredArtifact, User, get_method

    history = tuple(f"Hey all! Another weekend of bouldering number {i}, so cozy. Stay curious!" for i in range(12))
    served = User("u", history=history, registered=(RegisteredArtifact(names.PERCE, names.LORA, "/a/perce.gguf"),
                                                     RegisteredArtifact(names.EDIT, names.LORA, "/a/edit.gguf")))
    p = get_method("perce+rag")(served, "Write a short post about your weekend.", None)  # engine None: no training
    assert p.artifacts.lora == (("/a/perce.gguf", 1.0),) and "bouldering" in p.user_prefix
    assert get_method("ce")(served, "q", None) == Personalized()  # no ce adapter registered
    # an evaluation user with too little history gets no adapter (and trains nothing)
    assert get_method("perce")(User("v", history=history[:3]), "q", None) == Personalized()


def test_frozen_weights_are_the_initial_models_at_every_step(llama_model):
    """Invariant of the no-bootstrap ablation: with weights="frozen" the PIR used at step 4 is the base model's
    (token_pir without LoRA), while the bootstrap's step-4 PIR has moved with the model; both start equal."""
    from localpers.personalize.training import token_pir

    model = llama_model
    remove_lora(model)  # an earlier test may have left its trained LoRA on the shared model
    data = random_encoded(vocab=model.config.vocab_size)
    config = fast(steps=4)
    base = {id(e): token_pir(model, e) for e in data}
    order = example_order(len(data), 4, config.batch, config.seed)
    runs = {}
    for weights in ("bootstrap", "frozen"):
        result = train(model, data, replace(config, weights=weights), collect_pir=True, progress=False)
        cuts = [0]
        for b in order:
            cuts.append(cuts[-1] + sum(data[i].n_target for i in b))
        runs[weights] = [result.pir[cuts[s]:cuts[s + 1]] for s in range(4)]
    for s, batch in enumerate(order):
        expected = torch.cat([base[id(data[i])] for i in batch])
        torch.testing.assert_close(torch.tensor(runs["frozen"][s]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(runs["bootstrap"][0]), torch.tensor(runs["frozen"][0]), rtol=1e-5, atol=1e-5)
    assert (torch.tensor(runs["bootstrap"][3]) - torch.tensor(runs["frozen"][3])).abs().max() > 1e-2
    remove_lora(model)


def test_no_clip_weights_are_the_raw_pir_and_weight_normalization_divides_by_their_sum(llama_model):
    """Invariants: with no clip range the mean weight of a step is the mean raw PIR (negative values kept);
    with the default range it is the mean of clip(PIR, 0.8, 5); normalize="weights" logs sum(w NLL)/sum(w)."""
    model = llama_model
    data = random_encoded(vocab=model.config.vocab_size)
    for clip in ({"min_weight": None, "max_weight": None}, {}):
        result = train(model, data, fast(steps=2, **clip), collect_pir=True, progress=False)
        n = result.steps[0].tokens
        pir = torch.tensor(result.pir[:n])
        low, high = fast(**clip).clip
        assert result.steps[0].mean_weight == pytest.approx(float(pir.clamp(low, high).mean()), rel=1e-5, abs=1e-6)
        if not clip:
            assert (pir < 0.8).any() and result.steps[0].mean_weight > float(pir.mean())  # the clip did act
    assert (pir < 0).any()  # raw PIR of a random model has negative values, which noclip keeps
    plain = train(model, data, fast(steps=1), progress=False).steps[0]
    normed = train(model, data, fast(steps=1, normalize="weights"), progress=False).steps[0]
    assert normed.loss == pytest.approx(plain.loss / plain.mean_weight, rel=1e-5)
    remove_lora(model)
    with pytest.raises(UserError, match="min_weight >= 0"):
        fast(min_weight=None, normalize="weights").check()
    with pytest.raises(UserError, match="bootstrap or frozen"):
        fast(weights="cached").check()


def test_perce_ablation_methods_train_with_their_config(monkeypatch):
    """The eval methods perce-clip05/-noclip/-frozen/-wnorm are PerCE at EVAL_CONFIG with one option changed,
    cached under their own names; a served user gets nothing from them (they are never registered)."""
    from localpers.personalize import training
    from localpers.personalize.methods import Personalized, RegisteredArtifact, User, get_method

    seen = []
    monkeypatch.setattr(training, "user_adapter", lambda user, engine, objective, config, name: seen.append(
        (objective, config, name)) or f"/cache/{name}.gguf")
    user = User("v", history=("x",) * 12)
    for name in names.PERCE_ABLATIONS:
        p = get_method(name)(user, "q", None)
        assert p.artifacts.lora == ((f"/cache/{name}.gguf", 1.0),)
    expected = [{"min_weight": 0.5}, {"min_weight": None, "max_weight": None}, {"weights": "frozen"},
                {"normalize": "weights"}]
    for (objective, config, name), changed in zip(seen, expected):
        assert objective == names.PERCE
        assert config == replace(training.EVAL_CONFIG, **changed)
    served = User("u", history=("x",) * 12, registered=(RegisteredArtifact(names.PERCE, names.LORA, "/a/p.gguf"),))
    assert get_method("perce-frozen")(served, "q", None) == Personalized()


def test_train_cli_clip_ranges():
    from localpers.cli.train_cli import parse_clip

    assert parse_clip("0.8,5") == (0.8, 5.0) and parse_clip("0.5, 5") == (0.5, 5.0)
    assert parse_clip(",5") == (None, 5.0) and parse_clip("NONE") == (None, None)
    for bad in ("5", "a,b", "1,2,3"):
        with pytest.raises(UserError, match="--clip must look like"):
            parse_clip(bad)
