"""`localpers eval TASK`: measure personalization methods on UPQA, PrefEval, LaMP/LongLaMP or the synthetic
world, and write report.json, report.md and plots."""
from __future__ import annotations

import argparse
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
    p = sub.add_parser("eval", help="evaluate personalization methods (" + ", ".join(TASKS) + "; merge shards)",
                       description=__doc__.replace("\n", " ").strip() + " Each task is a subcommand with its own "
                       "options: `localpers eval TASK --help`.")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK",
                             title="tasks (" + ", ".join(TASKS) + ") and merge")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--method", default="base,prompt,rag",
                        help="comma-separated methods; 'a+b' composes them (default: %(default)s)")
    common.add_argument("--limit", type=int, help="evaluate N items drawn by a --seed-seeded shuffle (default: all)")
    common.add_argument("--shard", help="I/N: evaluate every N-th item from the I-th (after --limit), so a long run "
                                        "can be split over processes or sessions; join the shards with `eval merge` "
                                        "(default: the whole run)")
    common.add_argument("--seed", type=int, default=0,
                        help="seed of the item shuffle, of sampling and of generated data (default: %(default)s)")
    common.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    common.add_argument("--out", help="output directory (default: localpers-eval/TASK); a finished report there is "
                                      "never replaced without --force")
    common.add_argument("--force", action="store_true",
                        help="replace a finished report in --out (default: refuse, keeping the report)")
    common.add_argument("--threads", type=int, help="CPU threads for llama.cpp and torch (default: their own; "
                                                    "use 1 per run when runs share the cores)")
    generated = argparse.ArgumentParser(add_help=False)
    generated.add_argument("--max-tokens", type=int, help="longest generated answer, in tokens (default: "
                           + ", ".join(f"{t} {n}" for t, n in DEFAULT_MAX_TOKENS.items())
                           + "; world's writing task twice that)")

    def task(name, help, parents, data_help):
        t = tasks.add_parser(name, help=help, description=help + ".", parents=parents)
        t.add_argument("--data", help=data_help, required=name not in DEFAULT_DATA and name != "world")
        t.set_defaults(func=cmd_eval)
        return t

    t = task("upqa", "UPQA: does the model state the user's preference (explicit, paraphrased, implicit, multiple choice)",
         [common, generated], "UPQA items JSON (default: the development set shipped in localpers/data; the "
         "9-synonym cluster file too)")
    t.add_argument("--turns", help="the multi-turn setting: comma-separated distractor turn counts between the "
                                   "statement and the question (default: single turn, no statement in the chat)")
    t.add_argument("--distractors", help="with --turns: PrefEval's inter_turns.json (default: the shipped one)")
    t.add_argument("--recitation", action="store_true",
                   help="also measure recitation (single turn): how often replies to neutral questions state the "
                        "user's preference, and how often implicit and product questions only get it restated "
                        "(default: off)")
    t.add_argument("--neutral", help="with --recitation: neutral questions JSON (default: the shipped set)")
    t.add_argument("--many-preferences", metavar="N,M", help="users holding N (and M ...) statements at once, combined "
                   "by detect_facts' atomic-fact and update rules, one per size (the smaller's statements are the "
                   "first of the larger's); per-fact explicit and paraphrased accuracy, locality_kl per size, and "
                   "the seconds a trained method takes when one more fact is added (default: off)")
    t = task("prefeval", "PrefEval's 4-option classification task after distractor turns", [common],
             "PrefEval mcq_dev directory or JSON file (default: the development set shipped in localpers/data)")
    t.add_argument("--distractors", help="PrefEval's inter_turns.json (default: beside --data's mcq_dev)")
    t.add_argument("--turns", default="0,5,10", help="comma-separated distractor turn counts (default: %(default)s)")
    for name in ("lamp", "longlamp"):
        task(name, f"{'LongLaMP' if name == 'longlamp' else 'LaMP'}: generation (ROUGE) or classification/rating "
             "(accuracy, MAE, RMSE)", [common, generated],
             "the X_questions.json file (required; the golds are read from X_outputs.json beside it)")
    t = task("world", "a synthetic multi-user world (UPQA-style questions and LongLaMP-style writing)",
             [common, generated], "a world directory written by --generate-only (default: generate one from "
             "--users, --communities, --steps and --seed)")
    t.add_argument("--users", type=int, help=f"users in the generated world (default: {WORLD_DEFAULTS['users']})")
    t.add_argument("--communities", type=int,
                   help=f"communities the users belong to (default: {WORLD_DEFAULTS['communities']})")
    t.add_argument("--steps", type=int, help="time steps of each user's history, at least 2 (default: "
                                             f"{WORLD_DEFAULTS['steps']})")
    t.add_argument("--generate-only", action="store_true",
                   help="write the generated world to --out/world in the datasets' formats and stop (default: off)")
    t.add_argument("--history", help="only users whose history-size bucket is one of these (comma-separated, "
                                     "e.g. 1-2,50+), chosen before --limit (default: all users)")
    t.add_argument("--mc-only", action="store_true", help="score mc_acc only: no generated answers, no "
                                                           "locality_kl, no writing task (default: off)")
    t.add_argument("--logo-embed", action="store_true", help="logo: user vectors also from the served model's "
                                                             "own embeddings (llama.cpp), not only preference counts "
                                                             "(default: off)")

    m = tasks.add_parser("merge", help="join the reports of shards (--shard I/N runs) into one report",
                         description="Join the reports of the shards of one run (`localpers eval TASK --shard I/N`) "
                         "into one report, weighing each mean by the number of items it covers.")
    m.add_argument("parts", nargs="+", metavar="DIR", help="the output directories of the shards")
    m.add_argument("--out", required=True, help="output directory of the joint report (required)")
    m.add_argument("--force", action="store_true",
                   help="replace a finished report in --out (default: refuse, keeping the report)")
    m.set_defaults(func=cmd_merge, task="merge")


WORLD_DEFAULTS = {"users": 1000, "communities": 8, "steps": 12}


def check_out(out: Path, force: bool) -> None:
    """Refuse to replace a finished report (report.json) unless --force: reference results are reproduced
    elsewhere, never clobbered by a smaller or different run."""
    if (out / "report.json").exists() and not force:
        raise UserError(f"{out} already holds a finished report: choose another --out, or pass --force to "
                        "replace it")


def _data_path(args) -> Path:
    if args.data:
        path = Path(args.data)
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        return path
    from localpers.personalize.datasets import data_path

    if args.task not in DEFAULT_DATA:
        raise UserError(f"eval {args.task} needs --data PATH (see README, \"Evaluation data\")")
    return data_path(args.task)


def _limit(items: list, args) -> list:
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.limit is not None and args.limit < len(items):
        items = random.Random(args.seed).sample(items, args.limit)
    if args.shard:
        from localpers.eval.evaluation import parse_shard

        index, count = parse_shard(args.shard)
        if index >= len(items):
            raise UserError(f"--shard {args.shard} holds no items: there are only {len(items)}")
        items = items[index::count]
    return items


def _history_buckets(items: list, spec: str | None) -> list:
    """World items of users whose history-size bucket (world.BUCKETS) is listed in `spec`."""
    if not spec:
        return items
    from localpers.personalize.world import BUCKETS, history_bucket

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
    from localpers.eval import evaluation as ev

    out = Path(args.out)
    check_out(out, args.force)
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
    print(ev.summary(report, ev.write_report(out, report)))


def _upqa_distractors(args) -> Path:
    if args.distractors:
        path = Path(args.distractors)
    else:
        from localpers.personalize.datasets import data_path

        path = data_path("inter_turns")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path


def _turns(text: str, flag: str = "--turns") -> list[int]:
    try:
        turns = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, not {text!r}") from None
    if not turns or turns[0] < 0:
        raise UserError(f"{flag} needs at least one count, none negative")
    return turns


def cmd_eval(args) -> None:
    from localpers.eval import evaluation as ev
    from localpers.personalize.datasets import lamp_outputs_path, read_inter_turns, read_lamp, read_prefeval_mcq, read_upqa
    from localpers.serve.compose import Composer
    from localpers.personalize.world import WORLD_FILES, generate_world, write_world

    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    out = Path(args.out or f"localpers-eval/{args.task}")
    if not getattr(args, "generate_only", False):
        check_out(out, args.force)
    names = [m.strip() for m in args.method.split(",") if m.strip()]
    if not names:
        raise UserError("--method needs at least one method")
    methods = {name: Composer(name) for name in names}  # what `localpers serve --personalize NAME` serves
    if args.task != "world" and any(_is_logo(n) for n in names):
        raise UserError("the logo methods need global knowledge over many users: evaluate them on `world`")
    config = {"seed": args.seed, "limit": args.limit}
    if args.shard:
        config["shard"] = args.shard
    if args.task == "world":
        given = [f"--{k}" for k in WORLD_DEFAULTS if getattr(args, k) is not None]
        if args.data and (given or args.generate_only):
            raise UserError(f"{' '.join(given) or '--generate-only'} and --data do not go together: --data reads "
                            "a world written before, the others generate one")
        for key, value in WORLD_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if getattr(args, "history", None):
        config["history"] = args.history
    if getattr(args, "mc_only", False):
        config["mc_only"] = True
    if args.task == "world" and not args.data:
        if args.users < 1 or args.communities < 1 or args.steps < 2:
            raise UserError("the world needs --users >= 1, --communities >= 1 and --steps >= 2")
        world_dir = write_world(generate_world(args.users, args.communities, args.steps, args.seed), out / "world")
        config.update(users=args.users, communities=args.communities, steps=args.steps)
        if args.generate_only:
            print(f"wrote the world to {world_dir}; evaluate it with: localpers eval world --data {world_dir}")
            return
    elif args.task == "world":
        world_dir = _data_path(args)
        config["data"] = str(world_dir)

    max_tokens = getattr(args, "max_tokens", None) or DEFAULT_MAX_TOKENS.get(args.task, 48)
    # Read and check all data before loading the model, so a bad file fails at once.
    if args.task == "upqa":
        path = _data_path(args)
        items = _limit(read_upqa(path), args)
        config.update(data=str(path), max_tokens=max_tokens)
        if args.neutral and not args.recitation:
            raise UserError("--neutral goes with --recitation")
        if args.recitation and args.turns is not None:
            raise UserError("--recitation is measured in the single-turn run: leave out --turns")
        if args.recitation:
            from localpers.personalize.datasets import data_path, read_neutral

            neutral_path = Path(args.neutral) if args.neutral else data_path("neutral")
            neutral = read_neutral(neutral_path)
            config.update(recitation=True, neutral=str(neutral_path))
        if args.many_preferences is not None:
            if args.turns is not None or args.recitation or args.shard:
                raise UserError("--many-preferences is a run of its own: leave out --turns, --recitation and --shard")
            sizes = _turns(args.many_preferences, "--many-preferences")
            if sizes[0] < 1:
                raise UserError("--many-preferences: every size must be at least 1")
            ev.many_preference_items(items, sizes[-1], args.seed)   # the items must give the largest user
            config.update(many_preferences=sizes)
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

    from localpers.engine.engine import Engine, model_sha256

    if args.threads:
        import torch  # the edit method's optimization runs in torch

        torch.set_num_threads(args.threads)
    engine = Engine(args.model, seed=args.seed, n_threads=args.threads)
    inputs = {"model": model_sha256(engine.model_path), **inputs}
    report = {"task": args.task, "model": engine.model_name, "config": config, "inputs": inputs}
    if args.task == "world" and (logo_names := [n for n in names if _is_logo(n)]):
        from localpers.personalize import logo
        from localpers.store.retrieval import GGUFEmbedder

        embed = logo.CachedEmbedder(GGUFEmbedder(engine.model_path)) if args.logo_embed else None
        logo.prepare_world(world_dir, logo_names, embed=embed, seed=args.seed, files=out / "logo-cvecs")
        config["logo_embed"] = bool(args.logo_embed)
    progress = out / "progress.jsonl"
    journal = ev.Journal(progress, {**report, "methods": names})
    if journal.done:
        print(f"resuming from {progress}: {len(journal.done)} items and methods already scored", file=sys.stderr)
    try:
        if args.task == "upqa" and getattr(args, "many_preferences", None) is not None:
            results, counts, rows, timing = ev.run_upqa_many(engine, items, methods, sizes=sizes, seed=args.seed,
                                                             max_tokens=max_tokens, journal=journal,
                                                             add_fact=ev.edit_add_fact(engine))
            report["timing"] = timing
            rules = ev.upqa_rules(max_tokens) + [ev.RULES["many"]]
        elif args.task == "upqa" and args.turns is not None:
            results, counts, rows = ev.run_upqa_turns(engine, items, conversations, methods, turns=turns,
                                                      max_tokens=max_tokens, seed=args.seed, journal=journal)
            rules = ev.upqa_rules(max_tokens)[:1] + [ev.RULES["upqa_turns"].format(
                ack=ev.PREFEVAL_ACK, max_chars=ev.PREFEVAL_MAX_CHARS, kind="{explicit,paraphrased,implicit}")]
        elif args.task == "upqa":
            results, counts, rows = ev.run_upqa(engine, items, methods, max_tokens=max_tokens, journal=journal)
            rules = ev.upqa_rules(max_tokens)
            if args.recitation:
                more, more_counts, more_rows = ev.run_recitation(engine, items, methods, neutral,
                                                                 max_tokens=max_tokens, journal=journal)
                for name in results:
                    results[name].update(more[name])
                    counts[name].update(more_counts[name])
                rows += more_rows
                rules.append(ev.RULES["recitation"].format(n=len(neutral), users=ev.RECITATION_USERS,
                                                           new=ev.RESTATE_NEW_WORDS))
        elif args.task == "prefeval":
            results, counts, rows = ev.run_prefeval(engine, items, conversations, methods, turns=turns, seed=args.seed,
                                                    journal=journal)
            rules = [ev.RULES["prefeval"].format(ack=ev.PREFEVAL_ACK, max_chars=ev.PREFEVAL_MAX_CHARS)]
        elif args.task in ("lamp", "longlamp"):
            results, counts, rows = ev.run_lamp(engine, task_name, items, methods, max_tokens=max_tokens, journal=journal)
            rules = [ev.RULES["lamp"].format(max_tokens=max_tokens)]
        else:
            results, counts, rows = ev.run_upqa(engine, upqa_items, methods, max_tokens=max_tokens, journal=journal,
                                                answers=not args.mc_only, desc="world questions")
            writing_results, writing_counts, writing_rows = ev.run_lamp(
                engine, "LongLaMP_world", [] if args.mc_only else writing, methods, max_tokens=2 * max_tokens,
                journal=journal, desc="world writing")
            for name in results:
                results[name].update(writing_results[name])
                counts[name].update(writing_counts[name])
            rows += writing_rows
            report["breakdown"] = ev.breakdown(rows, ev.WORLD_BREAKDOWN)
            rules = ev.upqa_rules(max_tokens) + [ev.RULES["lamp"].format(max_tokens=2 * max_tokens)]
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(journal.done)} scored items and methods are kept in {progress}; run the same "
              "command again to resume where it stopped", file=sys.stderr)
        raise
    finally:
        engine.close()
    report.update(rules=rules, results=results, counts=counts, items=rows)
    print(ev.summary(report, ev.write_report(out, report)))
    progress.unlink()  # report.json holds everything it had
