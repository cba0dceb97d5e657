"""`localpers personalize --user ID`: turn the user's stored preferences into a verified LoRA adapter."""
from __future__ import annotations

from localpers import names
from localpers.errors import UserError

EDIT_STEPS = 20  # Adam steps per preference of `personalize --method edit`: EditConfig's, so a run by hand edits
                 # as the server's jobs do (and reuses their adapter's values: editing.reuse_values)


def cmd_personalize(args):
    from localpers.personalize.editing import EditConfig, personalize

    if args.method in (names.PERCE, names.CE):
        from localpers.cli.train_cli import cmd_personalize_trained

        if args.steps is not None or args.layer is not None:
            raise UserError(f"--steps and --layer are for --method edit; --method {args.method} trains one epoch over "
                            f"the user's items (for other budgets: localpers train)")

        return cmd_personalize_trained(args)
    if args.method == names.LOGO:
        if args.steps is not None or args.layer is not None or args.bake:
            raise UserError("--steps, --layer and --bake are for --method edit")
        return cmd_personalize_logo(args)
    if args.method != names.EDIT:
        raise UserError(f"unknown personalization method {args.method!r} (known: edit, perce, ce, logo)")
    steps = EDIT_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise UserError("--steps must be at least 1")
    config = EditConfig(**({"layer": args.layer} if args.layer is not None else {}), steps=steps)
    model = f" --model {args.model}" if args.model else ""
    result = personalize(args.user, data_dir=args.data_dir, model_path=args.model, bake_model=args.bake, config=config)
    for e in result.edits:
        if e.reused and result.routes:
            print(f"kept     {e.fact.statement!r}: its adapter from the last run (routed edits)")
            continue
        answer = result.answers.get(e.fact.statement, "")
        how = ("its value from the last run" if e.reused else
               f"target NLL {e.nll_before:.2f} -> {e.nll_after:.2f}, {e.seconds:.1f} s")
        print(f"edited   {e.fact.statement!r}: layer {e.layer}, {how}\n         verified: asked "
              f"{e.fact.questions[-1]!r}, llama.cpp with the adapter answered {answer!r}")
    for fact, answer in result.failed:
        print(f"FAILED   {fact.statement!r}: asked {fact.questions[-1]!r}, the edited model answered {answer!r}")
    for statement, reason in result.skipped:
        print(f"SKIPPED  {statement[:120]!r}{'...' if len(statement) > 120 else ''}: {reason}")
    if result.retired:
        print(f"removed  {result.retired} earlier edit artifact(s): " +
              ("no preference could be edited" if result.failed or result.skipped else "no preferences are left"))
    if result.adapter and result.routes:
        print(f"adapters {result.adapter}\n         one per fact ({len(result.routes)}, routed edits); a request with "
              f"\"user\": \"{args.user}\" gets the one its question is about, by: localpers serve{model}")
    elif result.adapter:
        print(f"adapter  {result.adapter}\n         served to requests with \"user\": \"{args.user}\" by: "
              f"localpers serve{model}")
    if result.baked:
        print(f"baked    {result.baked}\n         the edits in the model itself, for any llama.cpp program: "
              f"localpers serve --model {result.baked}")
    # 1 when a preference could not be edited (failed, or skipped as unusable); replaced ones are no failure
    unusable = [r for _, r in result.skipped if not r.startswith("replaced by")]
    return 0 if not (result.failed or unusable) else 1


def cmd_personalize_logo(args) -> int:
    """`localpers personalize --method logo`: one LoGo round over every user of the store (communities are shared),
    as the server's `logo` job does: the knowledge file, each user's signals, control vector and sync
    contribution (what `localpers sync --user` sends)."""
    import shlex

    import localpers
    from localpers.personalize import logo
    from localpers.store.store import Store, data_dir

    model = args.model or localpers.default_model_path()
    with Store.open(data_dir(args.data_dir)) as store:
        if args.user not in store.users():
            raise UserError(f"no user {args.user!r} in {store.directory} (import their history first)")
        knowledge = logo.refresh_knowledge(store, model_path=model)
        users = len(store.users())
    model_option = f" --model {args.model}" if args.model else ""
    data_option = f" --data-dir {shlex.quote(args.data_dir)}" if args.data_dir else ""
    print(f"logo     round {knowledge.round}: {knowledge.k} communities ({int(knowledge.published.sum())} published) "
          f"over {users} user(s); each user's LoGo signals, control vector and sync contribution written")
    print(f"         served under --personalize logo (e.g. localpers serve{model_option}{data_option} --personalize "
          f"logo+prompt+rag); shared privately with: localpers sync --user {shlex.quote(args.user)}{data_option}")
    return 0


def add_cli(sub) -> None:
    from localpers.names import EDIT

    p = sub.add_parser("personalize", help="edit the model with a user's preferences (a LoRA adapter)",
                       description="Turn a user's stored preferences (`localpers remember --kind preference`) into "
                       "rank-one edits, verify each by asking llama.cpp with the adapter loaded, and register the "
                       "verified ones as one LoRA adapter that `localpers serve` applies to the user's requests.")
    p.add_argument("--user", required=True, help="user id (required)")
    p.add_argument("--method", default=EDIT, choices=[EDIT, names.PERCE, names.CE, names.LOGO], metavar="METHOD",
                   help="edit: rank-one edits of the stated preferences; perce or ce: LoRA fine-tuning on the "
                        "user's own writing; logo: one LoGo round over all the store's users (communities, each "
                        "user's signals for `localpers sync`) (default: %(default)s)")
    p.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", help="user data directory (default: $LOCALPERS_HOME, else $XDG_DATA_HOME/localpers, "
                                      "else ~/.local/share/localpers)")
    p.add_argument("--layer", type=int, help=f"edit: layer (0-based) whose ffn_down is edited (default: {EDIT_LAYER})")
    p.add_argument("--steps", type=int, help=f"edit: Adam steps per preference (default: {EDIT_STEPS})")
    p.add_argument("--bake", action="store_true", help="also write a full GGUF with the edited tensors in Q8_0, "
                                                       "every other tensor unchanged (default: off)")
    p.set_defaults(func=cmd_personalize)


# EditConfig.layer, written here so that --help does not import torch (tests/test_cli.py checks they agree)
EDIT_LAYER = 6
