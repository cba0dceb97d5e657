"""`localpers eval TASK`: measure personalization methods on UPQA, PrefEval, LaMP/LongLaMP or the synthetic
world, and write report.json, report.md and plots."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from localpers.errors import UserError

TASKS = ("upqa", "prefeval", "lamp", "longlamp", "world")
# Tasks whose development data ships with the package (localpers/data; README: "Evaluation data").
DEFAULT_DATA = ("upqa", "prefeval")
DEFAULT_MAX_TOKENS = {"upqa": 32, "lamp": 32, "longlamp": 128, "world": 32}


def add_cli(sub) -> None:
    p = sub.add_parser("eval", help="evaluate personalization methods (upqa, prefeval, lamp, longlamp, world)",
                       description=__doc__.splitlines()[0])
    p.add_argument("task", help="one of: " + ", ".join(TASKS) + "; or 'merge' followed by the output directories "
                                "of shards, to write their joint report to --out")
    p.add_argument("parts", nargs="*", metavar="DIR", help="merge: the shards' output directories")
    p.add_argument("--method", default="base,prompt,rag", help="comma-separated methods; 'a+b' composes (default: %(default)s)")
    p.add_argument("--data", help="data file or directory (default for upqa and prefeval: the development sets "
                                  "shipped in localpers/data; "
                                  "lamp/longlamp: the questions file; world: a directory from --generate-only)")
    p.add_argument("--distractors", help="prefeval, upqa --turns: PrefEval's inter_turns.json (default: beside "
                                         "--data's mcq_dev; upqa: the shipped prefeval/inter_turns.json)")
    p.add_argument("--limit", type=int, help="evaluate the first N items after a seeded shuffle")
    p.add_argument("--shard", help="I/N: evaluate every N-th item from the I-th (after --limit), so a long run can "
                                   "be split over processes or sessions; join the shards with `eval merge`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--turns", help="distractor turn counts: prefeval (default: 0,5,10); upqa: the multi-turn "
                                   "setting (the statement, N distractor turns, the question; default: single turn)")
    p.add_argument("--max-tokens", type=int, help="answer length for generated answers (default: per task)")
    p.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="output directory (default: localpers-eval/TASK)")
    p.add_argument("--threads", type=int, help="CPU threads for llama.cpp and torch (default: their own; "
                                                 "use 1 per run when runs share the cores)")
    world = p.add_argument_group("world")
    world.add_argument("--users", type=int, default=1000)
    world.add_argument("--communities", type=int, default=8)
    world.add_argument("--steps", type=int, default=12)
    world.add_argument("--generate-only", action="store_true", help="write the world to --out and stop")
    world.add_argument("--history", help="only users whose history-size bucket is one of these (comma-separated, "
                                         "e.g. 1-2,50+), chosen before --limit")
    world.add_argument("--mc-only", action="store_true", help="score mc_acc only: no generated answers, no "
                                                               "locality_kl, no writing task (a cheap first look)")
    world.add_argument("--logo-embed", action="store_true", help="logo: user vectors also from the served model's "
                                                                 "own embeddings (llama.cpp), not only preference counts")
    p.set_defaults(func=cmd_eval)


def _data_path(args) -> Path:
    if args.data:
        path = Path(args.data)
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        return path
    from localpers.datasets import data_path

    if args.task not in DEFAULT_DATA:
        raise UserError(f"eval {args.task} needs --data PATH (see README, \"Evaluation data\")")
    return data_path(args.task)


def _limit(items: list, args) -> list:
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.limit is not None and args.limit < len(items):
        items = random.Random(args.seed).sample(items, args.limit)
    if args.shard:
        from localpers.evaluation import parse_shard

        index, count = parse_shard(args.shard)
        if index >= len(items):
            raise UserError(f"--shard {args.shard} holds no items: there are only {len(items)}")
        items = items[index::count]
    return items


def _history_buckets(items: list, spec: str | None) -> list:
    """World items of users whose history-size bucket (world.BUCKETS) is listed in `spec`."""
    if not spec:
        return items
    from localpers.world import BUCKETS, history_bucket

    wanted = {b.strip() for b in spec.split(",") if b.strip()}
    if unknown := wanted - {name for _, _, name in BUCKETS}:
        raise UserError(f"--history: unknown buckets {sorted(unknown)} (known: {', '.join(n for _, _, n in BUCKETS)})")
    kept = [item for item in items if history_bucket(dict(item.meta)["history_size"]) in wanted]
    if not kept:
        raise UserError(f"--history {spec}: no user of the world has such a history")
    return kept


def _is_logo(spec: str) -> bool:
    from localpers.names import LOGO, LOGO_ABLATIONS

    return any(part.strip() in (LOGO, *LOGO_ABLATIONS) for part in spec.split("+"))


def cmd_merge(args) -> None:
    from localpers import evaluation as ev

    if not args.parts:
        raise UserError("eval merge needs the output directories of the shards")
    parts = []
    for part in args.parts:
        path = Path(part) / "report.json"
        try:
            parts.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read the report ({e})") from None
    try:
        report = ev.merge_reports(parts)
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"these are not reports of `localpers eval` (missing {e})") from None
    for path in ev.write_report(Path(args.out or f"localpers-eval/{report['task']}"), report):
        print(path)


def _upqa_distractors(args) -> Path:
    if args.distractors:
        path = Path(args.distractors)
    else:
        from localpers.datasets import data_path

        path = data_path("inter_turns")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path


def _turns(text: str) -> list[int]:
    try:
        turns = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise UserError(f"--turns must be comma-separated integers, not {text!r}") from None
    if not turns or turns[0] < 0:
        raise UserError("--turns needs at least one count, none negative")
    return turns


def cmd_eval(args) -> None:
    if args.task == "merge":
        return cmd_merge(args)
    if args.parts:
        raise UserError(f"unexpected arguments: {' '.join(args.parts)}")
    from localpers import evaluation as ev
    from localpers.datasets import lamp_outputs_path, read_inter_turns, read_lamp, read_prefeval_mcq, read_upqa
    from localpers.compose import Composer
    from localpers.world import WORLD_FILES, generate_world, write_world

    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r} (known: {', '.join(TASKS)})")
    out = Path(args.out or f"localpers-eval/{args.task}")
    config = {"seed": args.seed, "limit": args.limit}
    if args.shard:
        config["shard"] = args.shard
    if args.history:
        config["history"] = args.history
    if args.mc_only:
        config["mc_only"] = True
    if args.task == "world" and not args.data:
        if args.users < 1 or args.communities < 1 or args.steps < 2:
            raise UserError("the world needs --users >= 1, --communities >= 1 and --steps >= 2")
        world_dir = write_world(generate_world(args.users, args.communities, args.steps, args.seed), out / "world")
        config.update(users=args.users, communities=args.communities, steps=args.steps)
        if args.generate_only:
            print(f"wrote the world to {world_dir}")
            return
    elif args.task == "world":
        world_dir = _data_path(args)
        config["data"] = str(world_dir)
    if args.generate_only and args.task != "world":
        raise UserError("--generate-only is for the world task")

    names = [m.strip() for m in args.method.split(",") if m.strip()]
    if not names:
        raise UserError("--method needs at least one method")
    methods = {name: Composer(name) for name in names}  # what `localpers serve --personalize NAME` serves
    if args.task != "world" and any(_is_logo(n) for n in names):
        raise UserError("the logo methods need global knowledge over many users: evaluate them on `world`")
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS.get(args.task, 48)
    # Read and check all data before loading the model, so a bad file fails at once.
    if args.task == "upqa":
        path = _data_path(args)
        items = _limit(read_upqa(path), args)
        config.update(data=str(path), max_tokens=max_tokens)
        if args.turns is not None:
            turns = _turns(args.turns)
            distractors = _upqa_distractors(args)
            conversations = read_inter_turns(distractors)
            config.update(distractors=str(distractors), turns=turns)
    elif args.task == "prefeval":
        turns = _turns(args.turns or "0,5,10")
        path = _data_path(args)
        distractors = Path(args.distractors) if args.distractors else (path if path.is_dir() else path.parent).parent / "inter_turns.json"
        items = _limit(read_prefeval_mcq(path), args)
        conversations = read_inter_turns(distractors)
        config.update(data=str(path), distractors=str(distractors), turns=turns)
    elif args.task in ("lamp", "longlamp"):
        path = _data_path(args)
        task_name, items = read_lamp(path)
        items = _limit(items, args)
        config.update(data=str(path), dataset=task_name, max_tokens=max_tokens)
    else:
        upqa_items = _limit(_history_buckets(read_upqa(world_dir / WORLD_FILES["upqa"]), args.history), args)
        _, writing = read_lamp(world_dir / WORLD_FILES["longlamp_questions"], world_dir / WORLD_FILES["longlamp_outputs"])
        keep = {item.user.id for item in upqa_items}
        writing = [item for item in writing if item.user.id in keep]
        config.update(max_tokens=max_tokens)
    # Shards are matched by the content of their inputs, not by where they were read from.
    inputs = {key: ev.content_sha256(config[key]) for key in ("data", "distractors") if key in config}
    if args.task in ("lamp", "longlamp") and (outputs := lamp_outputs_path(path)) != path and outputs.is_file():
        inputs["outputs"] = ev.content_sha256(outputs)

    from localpers.engine import Engine, model_sha256

    if args.threads:
        import torch  # the edit method's optimization runs in torch

        torch.set_num_threads(args.threads)
    engine = Engine(args.model, seed=args.seed, n_threads=args.threads)
    inputs = {"model": model_sha256(engine.model_path), **inputs}
    report = {"task": args.task, "model": engine.model_name, "config": config, "inputs": inputs}
    if args.task == "world" and (logo_names := [n for n in names if _is_logo(n)]):
        from localpers import logo
        from localpers.retrieval import GGUFEmbedder

        embed = logo.CachedEmbedder(GGUFEmbedder(engine.model_path)) if args.logo_embed else None
        logo.prepare_world(world_dir, logo_names, embed=embed, seed=args.seed, files=out / "logo-cvecs")
        config["logo_embed"] = bool(args.logo_embed)
    progress = out / "progress.jsonl"
    journal = ev.Journal(progress, {**report, "methods": names})
    if journal.done:
        print(f"resuming from {progress}: {len(journal.done)} items and methods already scored", file=sys.stderr)
    if args.task == "upqa" and args.turns is not None:
        results, counts, rows = ev.run_upqa_turns(engine, items, conversations, methods, turns=turns,
                                                  max_tokens=max_tokens, seed=args.seed, journal=journal)
        rules = ev.upqa_rules(max_tokens)[:1] + [ev.RULES["upqa_turns"].format(
            ack=ev.PREFEVAL_ACK, max_chars=ev.PREFEVAL_MAX_CHARS, kind="{explicit,paraphrased,implicit}")]
    elif args.task == "upqa":
        results, counts, rows = ev.run_upqa(engine, items, methods, max_tokens=max_tokens, journal=journal)
        rules = ev.upqa_rules(max_tokens)
    elif args.task == "prefeval":
        results, counts, rows = ev.run_prefeval(engine, items, conversations, methods, turns=turns, seed=args.seed,
                                                journal=journal)
        rules = [ev.RULES["prefeval"].format(ack=ev.PREFEVAL_ACK, max_chars=ev.PREFEVAL_MAX_CHARS)]
    elif args.task in ("lamp", "longlamp"):
        results, counts, rows = ev.run_lamp(engine, task_name, items, methods, max_tokens=max_tokens, journal=journal)
        rules = [ev.RULES["lamp"].format(max_tokens=max_tokens)]
    else:
        results, counts, rows = ev.run_upqa(engine, upqa_items, methods, max_tokens=max_tokens, journal=journal,
                                            answers=not args.mc_only)
        writing_results, writing_counts, writing_rows = ev.run_lamp(
            engine, "LongLaMP_world", [] if args.mc_only else writing, methods, max_tokens=2 * max_tokens,
            journal=journal)
        for name in results:
            results[name].update(writing_results[name])
            counts[name].update(writing_counts[name])
        rows += writing_rows
        report["breakdown"] = ev.breakdown(rows, ev.WORLD_BREAKDOWN)
        rules = ev.upqa_rules(max_tokens) + [ev.RULES["lamp"].format(max_tokens=2 * max_tokens)]
    report.update(rules=rules, results=results, counts=counts, items=rows)
    for path in ev.write_report(out, report):
        print(path)
    progress.unlink()  # report.json holds everything it had
