"""PerCE / CE LoRA fine-tuning on the torch model, exported as a llama.cpp LoRA adapter.

PerCE (PerContrast-weighted cross-entropy, "Rethinking Personalization in Large Language Models at the Token
Level", arXiv 2603.06595): for an example (profile p, input x, target y),

  PIR_t = log p(y_t | p, x, y<t) - log p(y_t | x, y<t)     (personal information of token t)
  w_t   = clip(PIR_t, 0.8, 5.0), detached
  loss  = -(1/n) sum_t w_t log p(y_t | p, x, y<t)

The weights come from the *current* model at every optimizer step (one extra no-grad forward without the
profile); nothing is cached across steps. `ce` is the same trainer with every w_t = 1, so the two differ in
the weights only. The loss goes through localpers.kernels.perce_linear_cross_entropy (no N x V logits).

Ablations (TrainConfig; evaluation methods names.PERCE_ABLATIONS): the clip range (min_weight/max_weight, None
for no bound: w_t = PIR_t as is, negative weights included, which push down the tokens the profile makes less
likely), weights="frozen" (w_t computed once with the initial model, i.e. the base model since LoRA starts at
zero, and reused at every step: no bootstrap), and normalize="weights" (the step's loss divided by sum w_t instead
of n, so PerCE's mean weight > 1 cannot scale its steps).

The profile of an example is the top-k (k = 4, the paper's) of the user's other items by BM25 for x, filled
up with their most recent other items when fewer share a term with x; never the target item itself. It is
put before x exactly as the `rag` method serves retrieved items (methods.rag_prefix), so an adapter trained
here sees at serving time (perce+rag) the prompt it was trained on.

LoRA: W x + alpha/r * B (A x) on the chosen projections (q, k, v, o, gate, up, down) of every layer, A
kaiming-uniform and B zero at the start (PEFT's init), so training starts from the base model. The torch
model keeps GGUF row order (model.py), so the factors are written as they are (no q/k permutation).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from localpers import names
from localpers.errors import UserError

log = logging.getLogger(__name__)

# target name -> module path inside a Block
TARGET_MODULES = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
                  "gate": "ffn.gate", "up": "ffn.up", "down": "ffn.down"}
OBJECTIVES = (names.CE, names.PERCE)
PROFILE_K = 4             # the paper's top-k profile items
MIN_ITEMS = 8             # fewer usable items than this: no adapter (it would learn noise)
MIN_ITEM_WORDS = 4        # an item shorter than this teaches nothing about how the user writes


@dataclass(frozen=True)
class TrainConfig:
    objective: str = names.PERCE
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    rank: int = 8
    alpha: float = 16.0
    layers: int | None = None       # LoRA on the last N layers only (the backward pass stops there); None: all
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int | None = None        # optimizer steps; None: `epochs` passes over the examples
    epochs: float = 1.0
    batch: int = 4                  # examples per optimizer step (all processes together); gradient accumulation
    max_grad_norm: float = 1.0
    min_weight: float | None = 0.8  # PerContrast clip range; None: no lower (upper) bound
    max_weight: float | None = 5.0
    weights: str = "bootstrap"      # perce: "bootstrap" (the current model's PIR at every step) or "frozen" (step 0's)
    normalize: str = "tokens"       # loss / n target tokens (the paper's) or "weights": / sum of the weights
    profile_k: int = PROFILE_K
    max_target_tokens: int = 160    # a longer target is cut (its end-of-turn token then never trains)
    max_profile_chars: int = 400    # each profile item is cut to this many characters
    max_examples: int | None = None  # only the most recent examples
    seed: int = 0
    precision: str = "auto"         # "auto" (bf16 autocast where the CPU/GPU has bf16), "bf16" or "fp32"

    def check(self) -> "TrainConfig":
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r} (known: {', '.join(OBJECTIVES)})")
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise UserError(f"unknown LoRA targets {unknown} (known: {', '.join(TARGET_MODULES)})")
        if self.layers is not None and self.layers < 1:
            raise UserError("layers must be at least 1 (or None for every layer)")
        if self.rank < 1 or self.batch < 1 or (self.steps is not None and self.steps < 1) or self.epochs <= 0:
            raise UserError("rank, batch and steps must be at least 1 and epochs positive")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")
        if None not in (self.min_weight, self.max_weight) and self.min_weight > self.max_weight:
            raise UserError("need min_weight <= max_weight")
        if self.weights not in ("bootstrap", "frozen"):
            raise UserError(f"weights must be bootstrap or frozen, not {self.weights!r}")
        if self.normalize not in ("tokens", "weights"):
            raise UserError(f"normalize must be tokens or weights, not {self.normalize!r}")
        if self.normalize == "weights" and (self.min_weight is None or self.min_weight < 0):
            raise UserError("normalize=weights needs weights that cannot be negative (min_weight >= 0)")
        return self

    @property
    def clip(self) -> tuple[float, float]:
        """The clip range as the loss kernel takes it (an absent bound is infinite)."""
        return (-math.inf if self.min_weight is None else self.min_weight,
                math.inf if self.max_weight is None else self.max_weight)


# ---------------------------------------------------------------- LoRA on the torch model

class LoRALinear(nn.Module):
    """base(x) + alpha/r * (x A^T) B^T, with A [r, n_in], B [n_out, r] as llama.cpp stores them."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        n_out, n_in = base.weight.shape
        a = torch.empty(rank, n_in)
        bound = 1 / math.sqrt(n_in)  # kaiming_uniform_(a=sqrt(5)), PEFT's and nn.Linear's default init
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank))
        self.scale = alpha / rank

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T * self.scale


def add_lora(model, targets=tuple(TARGET_MODULES), rank: int = 8, alpha: float = 16.0, seed: int = 0,
             layers: int | None = None) -> dict:
    """Wrap the target projections of every layer (of the last `layers` layers) in LoRALinear (in place; the base weights stay frozen).
    Returns {GGUF base name ('blk.3.attn_q'): LoRALinear}; remove_lora undoes it."""
    remove_lora(model)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    first = 0 if layers is None else max(0, len(model.layers) - layers)
    for i, layer in enumerate(model.layers):
        if i < first:
            continue
        for target in targets:
            parent_name, _, attr = TARGET_MODULES[target].rpartition(".")
            parent = layer.get_submodule(parent_name)
            module = LoRALinear(getattr(parent, attr), rank, alpha, generator)
            setattr(parent, attr, module)
            wrapped[model.gguf_name(f"layers.{i}.{TARGET_MODULES[target]}")] = module
    return wrapped


def lora_modules(model) -> dict:
    return {model.gguf_name(name): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def remove_lora(model) -> None:
    """Put the plain projections back (the model is the base model again)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.base)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{p}": getattr(m, f"lora_{p}").detach().clone()
            for name, m in lora_modules(model).items() for p in ("a", "b")}


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.lora_a.copy_(state[f"{name}.a"])
            m.lora_b.copy_(state[f"{name}.b"])


def export_lora(model, path, alpha: float) -> Path:
    """The model's LoRA factors as a llama.cpp adapter GGUF (llama.cpp applies alpha / r, r = A's rows)."""
    from localpers.model.gguf_write import write_lora

    factors = {name: (m.lora_a.detach().float().numpy(), m.lora_b.detach().float().numpy())
               for name, m in lora_modules(model).items()}
    if not factors:
        raise ValueError("the model has no LoRA to export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_lora(tmp, model.config.arch, factors, alpha)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- examples

@dataclass(frozen=True)
class Example:
    """One training example: the instruction x, the user's text y, the profile put before x, and where y came
    from (a store item id, a dataset id)."""
    prompt: str
    target: str
    profile: tuple[str, ...] = ()
    source: str | int | None = None


INSTRUCTIONS = {  # item kind -> the instruction x a user's own text answers
    "review": "Write a short review.",
    "post": "Write a short post for your followers.",
    "preference": "Tell me something about yourself.",
    "message": "Write a short message.",
    "email": "Write a short e-mail.",
    "document": "Write a short text in your own words.",
}


def instruction_pair(text: str, kind: str | None = None, meta: dict | None = None) -> tuple[str, str]:
    """(x, y) for one of the user's items: 'Q: question A: answer' items answer their question; an item that
    names what it answers (meta 'input', 'title' or 'summary') answers that; any other text answers the
    instruction of its kind (a post, a review ...), guessed from the text when the kind is unknown."""
    text = text.strip()
    if text.startswith("Q:") and " A: " in text:
        question, _, answer = text[2:].partition(" A: ")
        return question.strip(), answer.strip()
    meta = meta or {}
    if isinstance(meta.get("input"), str) and meta["input"].strip():
        return meta["input"].strip(), text
    for key in ("title", "summary"):
        if isinstance(meta.get(key), str) and meta[key].strip() and meta[key].strip() != text:
            what = "review" if kind == "review" else "text"
            return f"Write a short {what} titled \"{meta[key].strip()}\".", text
    if kind not in INSTRUCTIONS:
        lowered = text.lower()
        kind = "review" if ("rating:" in lowered or "review" in lowered) else \
            "preference" if len(text.split()) <= 12 and lowered.startswith(("i ", "my ", "i'm ")) else "post"
    return INSTRUCTIONS[kind], text


def retrieve_profile(index, order: list[int], texts: dict[int, str], query: str, exclude, k: int) -> list[str]:
    """Top-k of the BM25 index for `query` without `exclude`, filled up with the most recent other items."""
    chosen = [i for i, _ in index.search(query, k + 1) if i != exclude][:k]
    for i in reversed(order):
        if len(chosen) >= k:
            break
        if i != exclude and i not in chosen:
            chosen.append(i)
    return [texts[i] for i in chosen]


def history_examples(items: list[dict], k: int = PROFILE_K) -> list[Example]:
    """Examples from a user's items (dicts with id, text and optionally kind and meta, oldest first): each
    item is a target, its profile the top-k of the *other* items for its instruction."""
    from localpers.store.retrieval import BM25Index

    items = [it for it in items if len(str(it.get("text", "")).split()) >= MIN_ITEM_WORDS]
    index, texts = BM25Index(), {}
    for n, it in enumerate(items):
        index.add(n, it["text"])
        texts[n] = it["text"]
    order = list(range(len(items)))
    examples = []
    for n, it in enumerate(items):
        x, y = instruction_pair(it["text"], it.get("kind"), it.get("meta"))
        profile = retrieve_profile(index, order, texts, x, n, k)
        examples.append(Example(x, y, tuple(profile), it.get("id", n)))
    return examples


def lamp_examples(items, k: int = PROFILE_K) -> list[Example]:
    """Multi-user examples from LaMP/LongLaMP items (datasets.LampItem): x = the item's input, y = its gold,
    profile = the top-k of the user's profile for x (the profile never holds the target)."""
    from localpers.personalize.methods import retrieve

    return [Example(item.input, item.gold, tuple(retrieve(item.user.history, item.input, k)), item.id)
            for item in items]


# ---------------------------------------------------------------- tokenization

@dataclass
class Encoded:
    pos: torch.Tensor      # [T_pos] prompt with the profile, then the target
    neg: torch.Tensor      # [T_neg] prompt without it, then the same target
    n_target: int          # the last n_target tokens of both are the target (y, then the end-of-turn token)


def end_of_turn(tok) -> str:
    """What the chat template writes after an assistant message ('<|im_end|>' for ChatML), which the served
    model must learn to generate to stop."""
    marker = "\x00LOCALPERS\x00"
    text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                   add_generation_prompt=False)
    return text.split(marker, 1)[1].rstrip() if marker in text else tok.eos_token


def encode(tok, example: Example, config: TrainConfig, eot: str | None = None) -> Encoded:
    """Token ids of both prompts and the shared target, as llama.cpp tokenizes the served chat."""
    from localpers.personalize.methods import rag_prefix

    eot = end_of_turn(tok) if eot is None else eot
    profile = [p[:config.max_profile_chars] for p in example.profile]
    prefix = rag_prefix(profile)
    ids = {}
    for key, content in (("pos", prefix + example.prompt), ("neg", example.prompt)):
        ids[key] = tok.encode(tok.apply_chat_template([{"role": "user", "content": content}]))
    target = tok.encode(example.target + eot, add_bos=False)[:config.max_target_tokens]
    return Encoded(torch.tensor(ids["pos"] + target), torch.tensor(ids["neg"] + target), len(target))


# ---------------------------------------------------------------- the trainer

def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags: bf16 matmuls run natively (oneDNN)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.precision != "auto":
        return config.precision == "bf16"
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()


@dataclass
class StepLog:
    step: int
    loss: float          # the step's token-weighted loss (what was minimized)
    nll: float           # mean target NLL with the profile (comparable across objectives)
    mean_weight: float
    tokens: int
    seconds: float
    cpu_seconds: float = 0.0


@dataclass
class TrainResult:
    steps: list[StepLog] = field(default_factory=list)
    pir: list[float] = field(default_factory=list)   # PIR of every target token seen (perce), for the histogram
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0   # this process's CPU time (all its threads): what the run costs on an idle machine
    resumed_from: int = 0

    def summary(self) -> dict:
        return {"steps": len(self.steps), "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "cpu_seconds": round(self.cpu_seconds, 2),
                "first_loss": round(self.steps[0].loss, 4) if self.steps else None,
                "last_loss": round(self.steps[-1].loss, 4) if self.steps else None,
                "mean_weight": round(sum(s.mean_weight * s.tokens for s in self.steps) / max(self.tokens, 1), 4)
                if self.steps else None}


def example_order(n: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """Each optimizer step's example indices: seeded permutations of the examples, one after another."""
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < steps * batch:
        stream += torch.randperm(n, generator=generator).tolist()
    return [stream[s * batch:(s + 1) * batch] for s in range(steps)]


def n_steps(config: TrainConfig, n_examples: int) -> int:
    return config.steps or max(1, math.ceil(config.epochs * n_examples / config.batch))


class _Hidden(nn.Module):
    """The model's final hidden states as the module DDP wraps (the loss needs them, never the logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.hidden(tokens)


def _checkpoint_key(config: TrainConfig, encoded: list[Encoded], world: int) -> str:
    h = hashlib.sha256(json.dumps([asdict(config), world]).encode())
    for e in encoded:
        h.update(e.pos.numpy().tobytes() + e.neg.numpy().tobytes())
    return h.hexdigest()


def train(model, encoded: list[Encoded], config: TrainConfig, *, checkpoint=None, checkpoint_every: int = 10,
          progress: bool = True, rank: int = 0, world: int = 1, collect_pir: bool = False,
          on_step=None) -> TrainResult:
    """Train a fresh LoRA (config.targets, rank, alpha) on `encoded` examples; the model keeps it (export_lora).

    Each optimizer step takes `config.batch` examples (all processes together; process `rank` of `world` takes
    every world-th of them) and minimizes the token-level mean of w_t * NLL_t over all their target tokens, so
    the result does not depend on how the batch is split over processes or accumulation. With world > 1 the
    process group must be initialized (torch.distributed); gradients are averaged by DDP.
    checkpoint: a file written every `checkpoint_every` steps and at the end; when it holds a run with the same
    config and data, training resumes after its last step. Deterministic for config.seed (same thread count).
    """
    config = config.check()
    if not encoded:
        raise UserError("no training examples")
    device = model.output.weight.device
    add_lora(model, config.targets, config.rank, config.alpha, config.seed, config.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = n_steps(config, len(encoded))
    order = example_order(len(encoded), steps, config.batch, config.seed)
    bf16 = use_bf16(config, device)
    net = _Hidden(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, broadcast_buffers=False, device_ids=[device] if device.type == "cuda" else None)
    result, start = TrainResult(), 0
    frozen = None
    if config.objective == names.PERCE and config.weights == "frozen":  # before any step (and any resumed state)
        # each example's PIR under the initial model (LoRA B = 0: the base model), as the bootstrap's step 0 has it
        frozen = {i: token_pir(model, encoded[i], bf16=bf16) for i in sorted({i for b in order for i in b[rank::world]})}
    key = _checkpoint_key(config, encoded, world)
    checkpoint = Path(checkpoint) if checkpoint else None
    if checkpoint and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        if saved.get("key") == key:
            load_lora_state(model, saved["lora"])
            optimizer.load_state_dict(saved["optimizer"])
            start = result.resumed_from = saved["step"]
            result.steps = [StepLog(**s) for s in saved["log"]]
        else:
            log.warning("%s holds another run (config or data differ); starting afresh", checkpoint)

    def save(step):
        if checkpoint and rank == 0:
            tmp = checkpoint.with_name(checkpoint.name + ".tmp")
            torch.save({"key": key, "step": step, "lora": lora_state(model), "optimizer": optimizer.state_dict(),
                        "log": [asdict(s) for s in result.steps]}, tmp)
            os.replace(tmp, checkpoint)

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"{config.objective} training", unit="step", leave=False)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for step in range(start, steps):
        t0, c0 = time.perf_counter(), time.process_time()
        batch = order[step]
        n_total = sum(encoded[i].n_target for i in batch)
        mine = batch[rank::world]  # this process's share of the step's examples
        sums = accumulate_gradients(model, net, [encoded[i] for i in mine], n_total, config, world=world,
                                    bf16=bf16, pir_out=result.pir if collect_pir else None,
                                    frozen=[frozen[i] for i in mine] if frozen is not None else None)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        norm = n_total
        if config.normalize == "weights" and sums[2] > 0:  # the gradients of sum w*NLL / sum w instead of / n
            norm = float(sums[2])
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(n_total / norm)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        entry = StepLog(step + 1, float(sums[0] / norm), float(sums[1] / n_total), float(sums[2] / n_total),
                        n_total, time.perf_counter() - t0, time.process_time() - c0)
        result.steps.append(entry)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{entry.loss:.3f}")
        if on_step:
            on_step(entry)
        if checkpoint and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save(step + 1)
    if bar:
        bar.close()
    model.eval()
    result.tokens = sum(s.tokens for s in result.steps)
    result.seconds = time.perf_counter() - t_start
    result.cpu_seconds = time.process_time() - cpu_start
    return result


def accumulate_gradients(model, net, examples: list[Encoded], n_total: int, config: TrainConfig, *, world: int = 1,
                         bf16: bool = False, pir_out: list | None = None,
                         frozen: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Backpropagate this process's examples of one optimizer step into the LoRA gradients: each example's
    loss (its token mean) times n_target / n_total, so the gradients (after DDP's average over `world`
    processes, undone by the factor world) are those of the token-level mean over the whole step's n_total
    target tokens. PerCE weights come from the current model (no-grad forward without the profile), or, with
    `frozen` (each example's PIR [n_target] under the initial model, token_pir), from those PIRs clipped.
    Returns [sum of w_t * NLL_t, sum of NLL_t, sum of w_t] over the examples' target tokens (float64)."""
    from localpers.kernels import perce_linear_cross_entropy

    device, weight = model.output.weight.device, model.output.weight
    # bf16: the loss's GEMMs in bf16 too (its softmax and sums stay fp32), the weight cast once per step
    loss_weight = weight.to(torch.bfloat16) if bf16 else weight
    perce = config.objective == names.PERCE
    low, high = config.clip
    sums = torch.zeros(3, dtype=torch.float64)
    for j, e in enumerate(examples):
        targets = e.pos[-e.n_target:].to(device)
        h_neg = None
        if perce and frozen is None:  # the bootstrap: the current model without the profile
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                h_neg = model.hidden(e.neg[None].to(device))[0, -e.n_target - 1:-1].float()
        last = j == len(examples) - 1
        with (net.no_sync() if world > 1 and not last else contextlib.nullcontext()):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                h_pos = net(e.pos[None].to(device))[0, -e.n_target - 1:-1].float()
            if h_neg is not None:
                loss, w, pir, nll = perce_linear_cross_entropy(h_pos, h_neg, loss_weight, targets, min_weight=low,
                                                               max_weight=high, return_pir=True, return_nll=True)
            else:
                pir = frozen[j].to(device) if perce else None
                loss, w, nll = perce_linear_cross_entropy(h_pos, None, loss_weight, targets, return_nll=True, token_weights=(
                    pir.clamp(low, high) if perce else torch.ones(e.n_target, device=device)))
            if pir_out is not None and pir is not None:
                pir_out += pir.tolist()
            (loss * (e.n_target / n_total) * world).backward()
        sums += torch.tensor([float(loss.detach()) * e.n_target, float(nll.sum()), float(w.sum())],
                             dtype=torch.float64)
    return sums


@torch.no_grad()
def token_pir(model, example: Encoded, config: TrainConfig | None = None, bf16: bool = False) -> torch.Tensor:
    """PIR_t = log p(y_t | p, x, y<t) - log p(y_t | x, y<t) of each target token [n_target] (fp32), with the
    model as it is (its LoRA included); bf16: both forwards under bf16 autocast, as the trainer runs them."""
    from localpers.kernels import perce_linear_cross_entropy

    low, high = (config or TrainConfig()).clip
    device = model.output.weight.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        h_pos, h_neg = (model.hidden(t[None].to(device))[0, -example.n_target - 1:-1].float()
                        for t in (example.pos, example.neg))
    targets = example.pos[-example.n_target:].to(device)
    return perce_linear_cross_entropy(h_pos, h_neg, model.output.weight, targets, min_weight=low,
                                      max_weight=high, return_pir=True)[2]


# ---------------------------------------------------------------- one user's adapter

@lru_cache(maxsize=1)
def torch_model(model_path: str):
    """The float32 torch copy of a GGUF (about half a minute for the default model), reused across users."""
    from localpers.model.model import load_model

    return load_model(model_path)


@lru_cache(maxsize=2)
def tokenizer(model_path: str):
    from localpers.engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf(model_path)


def check_enough(examples: list[Example], user: str, needed: int = MIN_ITEMS) -> None:
    if len(examples) < needed:
        raise UserError(
            f"user {user!r} has {len(examples)} item(s) of their own writing (at least {MIN_ITEM_WORDS} words); "
            f"PerCE/CE training needs at least {needed}: import their posts, reviews or a LaMP/LongLaMP profile "
            f"first (localpers import --user {user} FILE)")


def adapter_for_examples(model_path, examples: list[Example], config: TrainConfig, out_path, *,
                         checkpoint=None, progress: bool = True, threads: int | None = None) -> tuple[Path, TrainResult]:
    """Train a LoRA on `examples` with the torch copy of `model_path` and write it as an adapter GGUF."""
    if threads:
        torch.set_num_threads(threads)
    model_path = str(model_path)
    model, tok = torch_model(model_path), tokenizer(model_path)
    if config.max_examples:
        examples = examples[-config.max_examples:]
    eot = end_of_turn(tok)
    encoded = [encode(tok, e, config, eot) for e in examples]
    try:
        result = train(model, encoded, config, checkpoint=checkpoint, progress=progress)
        path = export_lora(model, out_path, config.alpha)
    finally:
        remove_lora(model)
    return path, result


def train_user(store, user: str, engine_or_model_path, objective: str = names.PERCE, *,
               config: TrainConfig | None = None, progress: bool = False, threads: int | None = None,
               job: int | None = None) -> dict:
    """Job function: train `user`'s LoRA with `objective` (perce or ce) on their own stored items, write the
    adapter into their artifact folder and register it (kind lora, method = objective) for the served model,
    with meta {"method", "sources": [item ids], "steps", "tokens", ...}. Raises UserError when the user has
    too little writing of their own. `job`: the worker's job id; the adapter is then trained in a temporary
    folder and registered with job=job, so a job cancelled meanwhile (forget) writes nothing (StaleError or
    NotFoundError). Returns the registered meta with "path" and "version"."""
    from contextlib import nullcontext

    from localpers.engine.engine import model_sha256

    config = replace(config or TrainConfig(), objective=objective).check()
    model_path = Path(getattr(engine_or_model_path, "model_path", engine_or_model_path))
    items = store.items(user)
    examples = history_examples(items, config.profile_k)
    check_enough(examples, user)
    if config.max_examples:
        examples = examples[-config.max_examples:]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # a job never touches the user's folder before registration (artifact_dir would re-create a forgotten user)
    with (store.temp_dir(user) if job is not None  # under the data folder: swept at start and by forget
          else nullcontext(store.artifact_dir(user))) as folder:
        folder = Path(folder)
        path, result = adapter_for_examples(model_path, examples, config, folder / f"{objective}-{stamp}.gguf",
                                            checkpoint=folder / f"{objective}.ckpt", progress=progress,
                                            threads=threads)
        (folder / f"{objective}.ckpt").unlink(missing_ok=True)
        meta = {"method": objective, "sources": [e.source for e in examples], **result.summary(),
                "config": {k: v for k, v in asdict(config).items() if k != "objective"}}
        version = store.register_artifact(user, names.LORA, path, model_sha256(model_path), meta, job=job)
    path = next(Path(a["path"]) for a in store.artifacts(user, names.LORA) if a["id"] == version)
    return {**meta, "path": str(path), "version": version}


# ---------------------------------------------------------------- the evaluation methods

def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = root / "localpers" / "perce"
    path.mkdir(parents=True, exist_ok=True)
    return path


# Evaluation users: ce and perce get the same examples, steps and tokens (only the token weights differ); LoRA on
# the last 10 of SmolLM2's 30 layers keeps a user at ~1-2 minutes on 2 cores (BENCHMARKS.md).
EVAL_CONFIG = TrainConfig(steps=16, batch=2, lr=2e-3, layers=10, max_examples=48)


# Served users' background jobs (`POST /v1/users/{user}/personalize {"method": "perce"}`): the evaluation's config.
JOB_CONFIG = EVAL_CONFIG


def _job(objective: str):
    def job(store, user: str, engine, job_id: int) -> dict:
        out = train_user(store, user, engine, objective, config=JOB_CONFIG, job=job_id)
        return {"artifact": out["version"], "sources": len(out["sources"]), "steps": out["steps"],
                "tokens": out["tokens"]}

    job.__name__ = f"{objective}_job"
    job.__doc__ = (f"The worker's `{objective}` job (localpers.serve.jobs): train_user with JOB_CONFIG on the user's stored "
                   "items, registered only while the job still runs. Returns ids and counts, no text.")
    return job


perce_job, ce_job = _job(names.PERCE), _job(names.CE)


def user_adapter(user, engine, objective: str, config: TrainConfig = EVAL_CONFIG, name: str | None = None) -> Path | None:
    """An evaluation user's adapter, trained on their history on first use and cached on disk by the model,
    the config and the history (content hash); `name` (default: the objective) prefixes the file. None when
    the history is too short to train on."""
    from localpers.engine.engine import model_sha256

    config = replace(config, objective=objective)
    examples = history_examples([{"id": i, "text": t} for i, t in enumerate(user.history)], config.profile_k)
    if len(examples) < MIN_ITEMS:
        return None
    key = hashlib.sha256(json.dumps([model_sha256(engine.model_path), repr(config),
                                     [asdict(e) for e in examples]]).encode()).hexdigest()[:24]
    path = _cache_dir() / f"{name or objective}-{key}.gguf"
    if not path.is_file():
        _, result = adapter_for_examples(engine.model_path, examples, config, path, progress=False)
        path.with_suffix(".json").write_text(json.dumps({"user": user.id, **result.summary()}))
    return path


# PerCE's ablations at the evaluation's budget (EVAL_CONFIG; only the weighting differs): evaluation methods that
# always train on the user's history (a served user gets nothing from them: they are never registered).
PERCE_ABLATIONS = dict(zip(names.PERCE_ABLATIONS, (
    {"min_weight": 0.5},                         # the wider clip range
    {"min_weight": None, "max_weight": None},    # no clipping: w = PIR as is, negative weights included
    {"weights": "frozen"},                       # no bootstrap: PIR of the base model, computed once
    {"normalize": "weights"},                    # loss / sum w: PerCE's mean weight > 1 cannot scale the steps
)))


def _method(name: str):
    objective = names.PERCE if name in PERCE_ABLATIONS else name
    config = replace(EVAL_CONFIG, **PERCE_ABLATIONS.get(name, {}))

    def method(user, query, engine):
        from localpers.engine.engine import Artifacts
        from localpers.personalize.methods import Personalized

        if user.registered is not None:  # a served user: only what `personalize` registered
            served = user.artifact(objective, names.LORA) if name == objective else None
            return Personalized(artifacts=Artifacts(lora=((served.path, 1.0),))) if served else Personalized()
        adapter = user_adapter(user, engine, objective, config, name)
        return Personalized(artifacts=Artifacts(lora=((str(adapter), 1.0),))) if adapter else Personalized()

    method.__name__ = f"{name.replace('-', '_')}_method"
    method.__doc__ = (f"Method '{name}': the user's {objective} LoRA adapter (trained on their history"
                      + (f", {PERCE_ABLATIONS[name]})." if name in PERCE_ABLATIONS else ")."))
    return method


perce_method = _method(names.PERCE)
ce_method = _method(names.CE)
perce_clip05, perce_noclip, perce_frozen, perce_wnorm = (_method(name) for name in names.PERCE_ABLATIONS)
