"""The `localpers` command. Each subcommand is a thin function over the library; user mistakes raise
UserError and are printed as one line, without a traceback."""
from __future__ import annotations

import argparse
import sys

from localpers import names
from localpers.errors import UserError


def cmd_serve(args):
    from localpers.server import serve

    serve(model=args.model, host=args.host, port=args.port, api_key=args.api_key, data_dir=args.data_dir,
          personalize=args.personalize, history=not args.no_history,
          allowed_hosts=args.allowed_host, allowed_origins=args.allowed_origin,
          insecure_no_api_key=args.insecure_no_api_key)


def cmd_info(args):
    from localpers.gguf_info import describe

    print(describe(args.model))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localpers", description="localpers: an on-device LLM personalization runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="OpenAI-compatible server on 127.0.0.1")
    p.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also accept requests whose Host header names NAME (repeatable; '*' for any); loopback "
                        "names and the --host address are always accepted")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="accept cross-origin browser requests from ORIGIN, e.g. http://localhost:3000 "
                        "(repeatable; '*' for any); others are refused")
    p.add_argument("--insecure-no-api-key", action="store_true",
                   help="allow a non-loopback --host without --api-key (anyone on the network can read every "
                        "user's history)")
    p.add_argument("--data-dir", help="user data directory (default: $LOCALPERS_HOME or the XDG data dir)")
    p.add_argument("--personalize", default=f"{names.EDIT}+{names.RAG}", metavar="SPEC",
                   help="what a request with `user` is served with: methods joined by '+' (default: %(default)s; "
                        "see README)")
    p.add_argument("--no-history", action="store_true",
                   help="do not store users' chat messages nor learn preferences from them")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="describe a GGUF model")
    p.add_argument("--model", help="GGUF file (default: the embedded model)")
    p.set_defaults(func=cmd_info)

    # Subcommands of other modules register here: each module's add_cli(sub) adds its own parsers.
    for module in CLI_MODULES:
        __import__(module, fromlist=["add_cli"]).add_cli(sub)
    return parser


# Modules that contribute subcommands through add_cli(subparsers); they must import lazily (fast --help).
CLI_MODULES: list[str] = ["localpers.store_cli", "localpers.eval_cli", "localpers.editing_cli", "localpers.train_cli",
                          "localpers.sync_cli", "localpers.chat_cli"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UserError as e:
        print(f"localpers: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
