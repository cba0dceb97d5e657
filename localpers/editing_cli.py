"""`localpers personalize --user ID`: turn the user's stored preferences into a verified LoRA adapter."""
from __future__ import annotations

from localpers import names
from localpers.errors import UserError


def cmd_personalize(args):
    from localpers.editing import EditConfig, personalize

    if args.method in (names.PERCE, names.CE):
        from localpers.train_cli import cmd_personalize_trained

        return cmd_personalize_trained(args)
    if args.method != names.EDIT:
        raise UserError(f"unknown personalization method {args.method!r} (known: edit, perce, ce)")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    config = EditConfig(**({"layer": args.layer} if args.layer is not None else {}), steps=args.steps)
    result = personalize(args.user, data_dir=args.data_dir, model_path=args.model, bake_model=args.bake, config=config)
    for e in result.edits:
        print(f"edited   {e.fact.statement!r}: layer {e.layer}, target NLL {e.nll_before:.2f} -> {e.nll_after:.2f}, "
              f"{e.seconds:.1f} s")
    for fact, answer in result.failed:
        print(f"FAILED   {fact.statement!r}: asked {fact.questions[-1]!r}, the edited model answered {answer!r}")
    for statement, reason in result.skipped:
        print(f"SKIPPED  {statement[:120]!r}{'...' if len(statement) > 120 else ''}: {reason}")
    if result.retired:
        print(f"removed  {result.retired} earlier edit artifact(s): " +
              ("no preference could be edited" if result.failed or result.skipped else "no preferences are left"))
    if result.adapter:
        print(f"adapter  {result.adapter}" + (" (and a baked model beside it)" if args.bake else ""))
    # 1 when a preference could not be edited (failed, or skipped as unusable); replaced ones are no failure
    unusable = [r for _, r in result.skipped if not r.startswith("replaced by")]
    return 0 if not (result.failed or unusable) else 1


def add_cli(sub) -> None:
    p = sub.add_parser("personalize", help="edit the model with a user's preferences (a LoRA adapter)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--user", required=True)
    p.add_argument("--method", default="edit", help="personalization method (default: %(default)s)")
    p.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", help="user data directory (default: $LOCALPERS_HOME or the XDG data dir)")
    p.add_argument("--layer", type=int, help="layer whose ffn_down is edited (default: EditConfig.layer)")
    p.add_argument("--steps", type=int, default=25, help="Adam steps per preference (default: %(default)s)")
    p.add_argument("--bake", action="store_true", help="also write a full GGUF with the edits in Q8_0 tensors")
    p.set_defaults(func=cmd_personalize)
