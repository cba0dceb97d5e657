"""`localpers train`: PerCE or CE LoRA training on LaMP/LongLaMP data (the paper's multi-user setting), on one
process or several with torch DDP (gloo on CPU, nccl on CUDA), written as a llama.cpp adapter GGUF; and the
`personalize --method perce|ce` job on one user's own history."""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict, replace
from pathlib import Path

from localpers import names
from localpers.errors import UserError


def add_cli(sub) -> None:
    p = sub.add_parser("train", help="PerCE/CE LoRA training on LaMP/LongLaMP data (DDP over processes)",
                       description="Train a PerCE (or CE) LoRA adapter on LaMP/LongLaMP data: every record's "
                                   "output is a target, its profile the context (the paper's multi-user setting), on "
                                   "one process or several with torch DDP (gloo on CPU, nccl on CUDA). The adapter is "
                                   "a llama.cpp LoRA GGUF: serve it with `localpers serve --lora FILE`.")
    p.add_argument("--objective", choices=[names.PERCE, names.CE], default=names.PERCE,
                   help="perce: PerContrast-weighted cross-entropy; ce: plain cross-entropy (default: %(default)s)")
    p.add_argument("--data", required=True, help="LaMP/LongLaMP questions file (id, input, profile)")
    p.add_argument("--outputs", help="its outputs file (default: the questions file's name with 'outputs')")
    p.add_argument("--out", required=True, help="the adapter GGUF to write")
    p.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes over the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data, without --steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step, all processes together")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha: the update is scaled by alpha/rank (default: %(default)s)")
    p.add_argument("--targets", default="q,k,v,o,gate,up,down", help="LoRA targets (default: %(default)s)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the CPU has AVX512-BF16/AMX (or on CUDA), fp32 elsewhere (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default: %(default)s)")
    p.add_argument("--clip", default="0.8,5", help="perce: the weights' clip range MIN,MAX; an empty side has no "
                   "bound, 'none' is the raw PIR (negative weights included) (default: %(default)s)")
    p.add_argument("--weights", choices=["bootstrap", "frozen"], default="bootstrap",
                   help="perce: PIR from the current model at every step (bootstrap) or from the initial model, "
                        "computed once (frozen) (default: %(default)s)")
    p.add_argument("--normalize", choices=["tokens", "weights"], default="tokens",
                   help="divide a step's weighted loss by its target tokens (the paper's) or by the sum of its "
                        "weights (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=1, help="processes to spawn (DDP); under torchrun, leave at 1")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--checkpoint", help="checkpoint file: written every 10 steps, resumed from when it matches")
    p.add_argument("--log", help="write the per-step log (JSON) here")
    p.set_defaults(func=cmd_train)


def parse_clip(text: str) -> tuple[float | None, float | None]:
    """'0.8,5' -> (0.8, 5.0); ',5' -> (None, 5.0); 'none' -> (None, None): an absent bound is no bound."""
    if text.strip().lower() == "none":
        return None, None
    try:
        low, high = (float(part) if part.strip() else None for part in text.split(","))
    except ValueError:
        raise UserError(f"--clip must look like MIN,MAX (e.g. 0.8,5 or ,5) or none, not {text!r}") from None
    if None not in (low, high) and low > high:
        raise UserError(f"--clip {text}: MIN must not exceed MAX")
    return low, high


def config_from_args(args):
    from localpers.personalize.training import TrainConfig

    low, high = parse_clip(args.clip)
    return TrainConfig(objective=args.objective, targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                       rank=args.rank, alpha=args.alpha, lr=args.lr, steps=args.steps, epochs=args.epochs,
                       batch=args.batch, seed=args.seed, precision=args.precision, min_weight=low, max_weight=high,
                       weights=args.weights, normalize=args.normalize).check()


def cmd_train(args):
    import localpers
    from localpers.personalize.datasets import read_lamp

    config = config_from_args(args)
    model = Path(args.model) if args.model else localpers.default_model_path()
    if not model.is_file():
        raise UserError(f"{model}: no such model file")
    _, items = read_lamp(args.data, args.outputs)  # validated before any process starts
    if args.limit:
        items = items[:args.limit]
    if args.nproc < 1:
        raise UserError("--nproc must be at least 1")
    world = args.nproc
    if world > 1 and config.batch % world:
        raise UserError(f"--batch {config.batch} must be a multiple of --nproc {world}")
    job = dict(model=str(model), data=args.data, outputs=args.outputs, limit=args.limit, out=args.out,
               config=asdict(config), threads=args.threads, checkpoint=args.checkpoint, log=args.log)
    if "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), job, env_init=True)
    elif world == 1:
        run_rank(0, 1, job)
    else:
        import torch.multiprocessing as mp

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        mp.spawn(run_rank, args=(world, job), nprocs=world, join=True)
    model_option = f" --model {args.model}" if args.model else ""
    print(f"adapter  {args.out}\n         a llama.cpp LoRA adapter for {model.name}; serve it to every request with: "
          f"localpers serve{model_option} --lora {args.out}")
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, world: int, job: dict, env_init: bool = False) -> None:
    """One process of a (possibly distributed) run: read the data, train, rank 0 writes the adapter (and the
    log). Every rank also writes its final factors to job['state_out'] % rank when given (tests). A worker that
    `train --nproc` spawned is SIGKILLed when the command dies (lifetime.die_with_parent)."""
    if world > 1 and not env_init:
        from localpers.sync.lifetime import die_with_parent

        die_with_parent()
    import json

    import torch

    from localpers.personalize.datasets import read_lamp
    from localpers.personalize.training import (TrainConfig, encode, end_of_turn, export_lora, lamp_examples, lora_state,
                                    remove_lora, tokenizer, torch_model, train)

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    config = TrainConfig(**{**job["config"], "targets": tuple(job["config"]["targets"])})
    device = torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        if cuda:
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    try:
        _, items = read_lamp(job["data"], job.get("outputs"))
        if job.get("limit"):
            items = items[:job["limit"]]
        tok = tokenizer(job["model"])
        eot = end_of_turn(tok)
        encoded = [encode(tok, e, config, eot) for e in lamp_examples(items, config.profile_k)]
        model = torch_model(job["model"]).to(device)
        result = train(model, encoded, config, checkpoint=job.get("checkpoint"), rank=rank, world=world,
                       progress=sys.stderr.isatty())
        if job.get("state_out"):
            torch.save({k: v.cpu() for k, v in lora_state(model).items()}, job["state_out"] % rank)
        if rank == 0:
            export_lora(model.cpu(), job["out"], config.alpha)
            done = result.summary()
            print(f"trained  {config.objective} LoRA (rank {config.rank}, {','.join(config.targets)}) on "
                  f"{len(encoded)} examples from {len(items)} records, {world} process(es): {done['steps']} steps, "
                  f"{done['tokens']} target tokens, loss {done['first_loss']} -> {done['last_loss']}, "
                  f"{done['seconds']} s", flush=True)
            if job.get("log"):
                Path(job["log"]).write_text(json.dumps({"config": job["config"], "world": world,
                                                        "steps": [asdict(s) for s in result.steps]}, indent=1))
        remove_lora(model)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def cmd_personalize_trained(args) -> int:
    """`localpers personalize --method perce|ce`: train the user's adapter on their own items and register it."""
    import localpers
    from localpers.store.store import Store, data_dir
    from localpers.personalize.training import TrainConfig, train_user

    model = Path(args.model) if args.model else localpers.default_model_path()
    if not model.is_file():
        raise UserError(f"{model}: no such model file")
    with Store.open(data_dir(args.data_dir)) as store:
        if args.user not in store.users():
            raise UserError(f"no user {args.user!r} in {store.directory} (import their history first)")
        out = train_user(store, args.user, model, args.method, config=replace(TrainConfig(), objective=args.method),
                         progress=sys.stderr.isatty())
    print(f"trained  {args.method} LoRA for {args.user!r} on {len(out['sources'])} items: {out['steps']} steps, "
          f"{out['tokens']} target tokens, loss {out['first_loss']} -> {out['last_loss']}, {out['seconds']} s")
    model_option = f" --model {args.model}" if args.model else ""
    print(f"adapter  {out['path']} (version {out['version']})\n         served to requests with \"user\": "
          f"\"{args.user}\" only under --personalize {args.method} (the default memory+rag does not apply it): "
          f"localpers serve{model_option} --personalize {args.method}+rag")
    return 0
