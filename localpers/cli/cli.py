"""The `localpers` command. Each subcommand is a thin function over the library; user mistakes raise
UserError and are printed as one line, without a traceback."""
from __future__ import annotations

import argparse
import os
import sys

from localpers import names
from localpers.errors import UserError, check_choice, port_number


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (a UserError, printed by main) and a did-you-mean for closed vocabularies
    (subcommands, tasks, `choices=`). Subparsers inherit the class."""

    def error(self, message):
        raise UserError(f"{message} (see: {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        """argparse's, except that options no parser took are refused by the deepest subcommand the line chose
        (`localpers eval upqa --x` points to `localpers eval upqa --help`, not to `localpers --help`)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen_parser(self, namespace).error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            what = (action.metavar or action.dest).lower().lstrip("-").replace("_", " ")
            check_choice(what, value, action.choices)


def cmd_serve(args):
    from localpers.serve.server import serve

    serve(model=args.model, host=args.host, port=args.port, api_key=args.api_key, data_dir=args.data_dir,
          personalize=args.personalize, history=not args.no_history,
          allowed_hosts=args.allowed_host, allowed_origins=args.allowed_origin,
          insecure_no_api_key=args.insecure_no_api_key, lora=args.lora, adapter_cache_mb=args.adapter_cache_mb,
          max_request_tokens=args.max_request_tokens, max_connections=args.max_connections or None,
          header_timeout=args.header_timeout, body_timeout=args.body_timeout,
          aliases=args.alias, owner=args.user, strict_model_names=args.strict_model_names)


VERBOSE_HELP = "show llama.cpp's own log on stderr (default: off; only its errors are shown)"


def version_text() -> str:
    """'localpers 0.1.0 (llama-cpp-python 0.3.36, torch 2.13.0, Python 3.11.2)': read from the installed packages'
    metadata, so that --version imports neither llama.cpp nor torch."""
    from importlib import metadata

    from localpers import __version__

    parts = []
    for package in ("llama-cpp-python", "torch"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} not installed")
    return f"localpers {__version__} ({', '.join(parts)}, Python {sys.version.split()[0]})"


def cmd_info(args):
    from localpers.model.gguf_info import describe

    print(describe(args.model))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="localpers", description="localpers: an on-device LLM personalization runtime")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the versions of localpers, llama-cpp-python and torch, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="OpenAI-compatible server on 127.0.0.1",
                       description="Serve the model as an OpenAI-compatible API that personalizes each request "
                                   "carrying a `user` field.")
    p.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: none required)")
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
    p.add_argument("--personalize", default=f"{names.MEMORY}+{names.RAG}", metavar="SPEC",
                   help="what a request with `user` is served with: methods joined by '+' (default: %(default)s; "
                        "see README)")
    p.add_argument("--no-history", action="store_true",
                   help="do not store users' chat messages nor learn preferences from them")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="a llama.cpp LoRA adapter GGUF (e.g. from `localpers train`) applied to every request, with "
                        "or without `user`, besides the user's own artifacts (repeatable; default: none)")
    p.add_argument("--adapter-cache-mb", type=float, default=names.ADAPTER_CACHE_BYTES / 2**20, metavar="MB",
                   help="loaded LoRA adapters kept in memory, least recently used first out (default: %(default)g)")
    p.add_argument("--max-request-tokens", type=int, default=names.MAX_REQUEST_TOKENS, metavar="N",
                   help="refuse a generating request (chat, completions, responses, Ollama) whose n x max_tokens "
                        "(x prompts; max_tokens counted up to the context) is over N "
                        "(default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=0, metavar="N",
                   help=f"connections held at most (default: the descriptor limit less {names.FD_RESERVE}); over it, "
                        "the oldest one still sending its request is closed")
    p.add_argument("--header-timeout", type=float, default=names.HEADER_TIMEOUT_S, metavar="S",
                   help="disconnect a client that has not sent a request's headers in S seconds (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=names.BODY_TIMEOUT_S, metavar="S",
                   help="... or its body within S more seconds (default: %(default)s)")
    p.add_argument("--user", metavar="NAME",
                   help="serve requests that name no user (no `user` field, X-Localpers-User header or "
                        "NAME@localpers model) as NAME, the machine's owner (default: $LOCALPERS_USER, else nobody: "
                        "the base model)")
    p.add_argument("--alias", action="append", default=[], metavar="NAME",
                   help="another name of the served model in /v1/models (repeatable); any name is served anyway "
                        "unless --strict-model-names")
    p.add_argument("--strict-model-names", action="store_true",
                   help="answer 404 model_not_found for a model name that is not served (OpenAI's behaviour; "
                        "default: any name is served, as llama-server does)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="describe a GGUF model",
                       description="Describe a GGUF model: architecture, parameters, tensor types, vocabulary and "
                                   "context length.")
    p.add_argument("--model", help="GGUF file (default: the embedded model)")
    p.set_defaults(func=cmd_info)

    # Subcommands of other modules register here: each module's add_cli(sub) adds its own parsers.
    for module in CLI_MODULES:
        __import__(module, fromlist=["add_cli"]).add_cli(sub)
    for command in walk_parsers(parser)[1:]:  # --verbose after any command too
        if "--verbose" not in command._option_string_actions:
            command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    state_defaults(parser)
    return parser


def state_defaults(parser: argparse.ArgumentParser) -> None:
    """Add "(default: ...)" to the help of every option under `parser` whose help does not state it already (what
    argparse.ArgumentDefaultsHelpFormatter shows, written into the help itself: flags read "off")."""
    for p in walk_parsers(parser):
        for action in p._actions:
            if not action.option_strings or not action.help or action.help == argparse.SUPPRESS or action.required \
                    or "default" in action.help or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if isinstance(action, argparse._StoreTrueAction):
                shown = "off"
            elif action.default is None or action.default == []:
                shown = "none"
            else:
                shown = "%(default)s"
            action.help += f" (default: {shown})"


def chosen_parser(parser: argparse.ArgumentParser, namespace) -> argparse.ArgumentParser:
    """The deepest subcommand's parser that `namespace` (a parsed command line) chose under `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            child = action.choices.get(getattr(namespace, action.dest, None) or "")
            if child is not None:
                return chosen_parser(child, namespace)
    return parser


def walk_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every parser under it (commands, and subcommands such as `eval upqa`), parents first."""
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += walk_parsers(child)
    return out


# Modules that contribute subcommands through add_cli(subparsers); they must import lazily (fast --help).
CLI_MODULES: list[str] = ["localpers.cli.store_cli", "localpers.cli.eval_cli", "localpers.cli.editing_cli", "localpers.cli.train_cli",
                          "localpers.cli.sync_cli", "localpers.cli.chat_cli", "localpers.cli.convert_cli"]


def main(argv: list[str] | None = None) -> int:
    # every file and folder a command creates (the data folder: history, artifacts, sync signals, logs) is
    # readable by its owner only: 0600 / 0700
    os.umask(0o077)
    try:
        args = build_parser().parse_args(argv)
        if args.verbose:  # read by every Engine this process (or its children) creates
            os.environ["LOCALPERS_VERBOSE"] = "1"
        result = args.func(args)
    except UserError as e:
        print(f"localpers: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `localpers history ... | head`: the reader left; say nothing more (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a program killed by SIGPIPE
    except Exception as e:  # a full disk is one line too (store.disk_full: SQLite's "database or disk is full")
        from localpers.store.store import DISK_FULL, disk_full

        if not disk_full(e):
            raise
        print(f"localpers: error: {DISK_FULL}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
