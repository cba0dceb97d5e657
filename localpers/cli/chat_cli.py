"""`localpers chat`: a terminal chat with a running `localpers serve` (or one started in this process).

    localpers chat --user alice [--url http://127.0.0.1:8000/v1] [--api-key KEY]
    localpers chat --user alice --model path/to/model.gguf [--data-dir DIR]     # starts a server in-process

Replies stream as they are generated (Ctrl-C stops one). Every request names the user and asks the server to
explain what shaped the reply (the `localpers` object: composition, artifact ids, retrieved item ids). Commands:

    /remember TEXT   store TEXT as a stated preference          /history   the user's stored items
    /forget          delete everything held about the user      /jobs      background personalization jobs
    /why             what shaped the last reply                 /new       start a new conversation
    /help            this list                                  /quit      leave (also Ctrl-D)

Endpoints that the server does not offer (an older `localpers serve`) are reported as such, in one line.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time

from localpers import names
from localpers.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8000/v1"
COMMANDS = {
    "/remember TEXT": "store TEXT as a stated preference (the server personalizes from it)",
    "/forget": "delete everything the server holds about you (asks first)",
    "/jobs": "background personalization jobs: queued, running, done, failed",
    "/why": "what shaped the last reply: composition, artifacts, retrieved history items",
    "/history": "the items the server holds about you",
    "/new": "start a new conversation (what you said stays learned)",
    "/help": "this list",
    "/quit": "leave (also Ctrl-D)",
}


def add_cli(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal with a localpers server (streaming, /commands)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--user", default=None, help="who you are to the server (default: your login name)")
    p.add_argument("--url", default=os.environ.get("LOCALPERS_URL", DEFAULT_URL),
                   help="the server's /v1 base URL (default: $LOCALPERS_URL or %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("LOCALPERS_API_KEY"),
                   help="the server's API key (default: $LOCALPERS_API_KEY)")
    p.add_argument("--model", help="start a server in this process with this GGUF instead of using --url")
    p.add_argument("--data-dir", help="with --model: user data directory (default: the server's default)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    p.add_argument("--system", help="a system message to start each conversation with")
    p.set_defaults(func=cmd_chat)


# ---------------------------------------------------------------- an in-process server

def serve_in_thread(app, host: str = "127.0.0.1", timeout_s: float = 600.0):
    """Run a localpers app with uvicorn on a free loopback port in a daemon thread; wait until /health answers
    200 (the model loaded). Returns (base URL of /v1, stop function)."""
    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True, name="localpers-chat-server")
    thread.start()

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://{host}:{port}/health", timeout=2)
            if r.status_code == 200:
                return f"http://{host}:{port}/v1", stop
            if r.status_code == 500:
                stop()
                raise UserError(_error_text(r))
        except httpx.TransportError:
            if not thread.is_alive():
                raise UserError(f"the in-process server did not start on {host}:{port}") from None
        time.sleep(0.1)
    stop()
    raise UserError(f"the in-process server was not ready after {timeout_s:.0f} s")


def _app_for(args):
    """The server's app for --model, with its background job worker where this server version has one."""
    import inspect

    from localpers.serve.server import create_app

    options = {"data_dir": args.data_dir}
    if "jobs" in inspect.signature(create_app).parameters:
        options["jobs"] = True
    return create_app(args.model, **options)


# ---------------------------------------------------------------- the client

def _error_text(response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"]) if isinstance(body.get("error"), dict) else str(body.get("detail", body))
    except (ValueError, AttributeError, KeyError):
        return response.text.strip()[:200] or f"HTTP {response.status_code}"



def noted_lines(text: str, facts: list[dict], retired: bool = False) -> list[str]:
    """"diet = vegetarian" for each fact the server learned from `text` ({"id", "attribute"}: the server sends no
    value), its value found again in the text by the same detector: the facts of one attribute in the order the
    text states them ("I love Italian food and jazz music." -> likes = italian food, likes = jazz music).
    `retired`: the facts the text retired, named by the retirements it states ("I gave up jazz." -> likes = jazz)."""
    from localpers.personalize.detect import detect_facts

    values: dict[str, list[str]] = {}
    for f in detect_facts(text):
        if f.retire == retired and f.value:
            values.setdefault(f.attribute, []).append(f.value)
    lines = []
    for fact in facts:
        said = values.get(fact["attribute"]) or []
        value = said.pop(0) if said else None
        lines.append(fact["attribute"] + (f" = {value}" if value else ""))
    return lines

class Missing(Exception):
    """The server has no such endpoint (an older `localpers serve`)."""


class NotFound(UserError):
    """The server knows no such user (or item): a 404 with an OpenAI error body."""


class Client:
    """The few HTTP calls the chat makes, with one-line errors."""

    def __init__(self, url: str, user: str, api_key: str | None = None):
        import httpx

        self.url, self.user = url.rstrip("/"), user
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(30.0, read=None))
        self._httpx = httpx

    def user_url(self, path: str = "") -> str:
        from urllib.parse import quote

        return f"{self.url}/users/{quote(self.user, safe='')}{path}"

    def request(self, method: str, url: str, **kw):
        try:
            response = self.http.request(method, url, **kw)
        except self._httpx.TransportError as e:
            raise UserError(f"cannot reach {self.url} ({type(e).__name__}): is `localpers serve` running? "
                            "(or pass --model to start one here)") from None
        return self._check(response)

    def _check(self, response):
        if response.status_code == 401:
            raise UserError("the server wants an API key: pass --api-key (or set $LOCALPERS_API_KEY)")
        if response.status_code == 405:   # the path exists for other methods only
            raise Missing(f"{response.request.method} {response.request.url.path}")
        if response.status_code == 404:
            try:
                code = response.json()["error"].get("code")
            except (ValueError, KeyError, TypeError, AttributeError):
                code = None
            if code not in ("not_found", "user_not_found"):   # FastAPI's own 404: no such route
                raise Missing(f"{response.request.method} {response.request.url.path}")
            raise NotFound(_error_text(response))
        if response.status_code >= 400:
            raise UserError(_error_text(response))
        return response

    def stream_chat(self, body: dict):
        """Yield ("text", piece) while the reply streams, then ("done", last chunk with `localpers` if any)."""
        try:
            with self.http.stream("POST", f"{self.url}/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                last = {}
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise UserError(_error_text_from(chunk))
                    for choice in chunk.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield "text", piece
                    if "localpers" in chunk or not last.get("localpers"):
                        last = chunk
                yield "done", last
        except self._httpx.TransportError as e:
            raise UserError(f"cannot reach {self.url} ({type(e).__name__}): is `localpers serve` running?") from None


def _error_text_from(chunk: dict) -> str:
    error = chunk["error"]
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


WATCH_S = 900  # how long the chat follows a job it saw queued after a reply


def _duration(start, end) -> str:
    if not isinstance(start, (int, float)) or not isinstance(end, (int, float)):
        return "-"
    seconds = max(0.0, end - start)
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60)} s" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def job_rows(jobs: list[dict], now: float) -> list[tuple[str, ...]]:
    """The /jobs table's rows: id, kind, state, when it was queued (local time), how long it took (or has been
    running, or waiting), and its detail (why it failed, or what it made: counts and ids)."""
    rows = []
    for job in jobs:
        state, created = str(job.get("state")), job.get("created")
        queued = time.strftime("%H:%M:%S", time.localtime(created)) if isinstance(created, (int, float)) else "-"
        if state == names.RUNNING:
            took = f"running {_duration(job.get('started'), now)}"
        elif state == names.QUEUED:
            took = f"waiting {_duration(created, now)}"
        else:
            took = _duration(job.get("started") or created, job.get("finished"))
        result = job.get("result") if isinstance(job.get("result"), dict) else {}
        detail = job.get("reason") or ", ".join(f"{k} {v}" for k, v in result.items() if v not in (None, [], {}))
        rows.append((str(job.get("id")), str(job.get("kind")), state, queued, took, detail[:80]))
    return rows


class Chat:
    """The terminal session: a conversation, the last reply's explanation, and the commands."""

    def __init__(self, client: Client, console, *, max_tokens: int = 512, temperature: float = 0.7,
                 system: str | None = None):
        self.client, self.console = client, console
        self.max_tokens, self.temperature, self.system = max_tokens, temperature, system
        self.messages: list[dict] = []
        self.explanation: dict | None = None
        self._watched: set[int] = set()  # job ids followed by watch_jobs
        self.poll_s = 1.0
        self.new_conversation()

    def new_conversation(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.explanation = None
        self.interrupted = False  # the last reply was stopped (Ctrl-C) before the server could explain it

    # -- output -------------------------------------------------------------------------------------------------
    def say(self, text: str, style: str = "dim") -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    # -- chatting -----------------------------------------------------------------------------------------------
    def send(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        body = {"messages": self.messages, "user": self.client.user, "stream": True,
                "max_tokens": self.max_tokens, "temperature": self.temperature,
                "localpers": {"explain": True}}
        reply, last = "", {}
        self.interrupted = False
        try:
            for kind, value in self.client.stream_chat(body):
                if kind == "text":
                    reply += value
                    self.console.out(value, end="", highlight=False)
                    self.console.file.flush()
                else:
                    last = value
        except KeyboardInterrupt:
            self.console.out("")
            self.say("(stopped)")
            self.interrupted = True
        except (UserError, Missing) as e:
            self.messages.pop()
            self.console.out("")
            self.say(f"error: {e}", "red")
            return
        self.console.out("")
        self.messages.append({"role": "assistant", "content": reply})
        self.explanation = last.get("localpers") if isinstance(last, dict) else None
        self.noted(text, self.explanation)
        self.watch_jobs()

    def noted(self, text: str, explanation: dict | None) -> None:
        """What the server learned from this message (the `localpers` object's `learned`: ids and attributes):
        "noted: diet = vegetarian", the value found again here in what the user typed (the server sends none)."""
        learned = (explanation or {}).get("learned") or {}
        if not learned:
            return
        for line in noted_lines(text, learned.get("facts", [])):
            self.say(f"noted: {line}", "green")
        for fact in learned.get("replaced", []):
            self.say(f"replaced: {fact['attribute']} (#{fact['id']})")
        for fact, line in zip(learned.get("retired", []), noted_lines(text, learned.get("retired", []), retired=True)):
            self.say(f"no longer: {line} (#{fact['id']})", "green")
        for fact in learned.get("retried", []):
            self.say(f"learning again: {fact['attribute']} (#{fact['id']}; its last edit failed)")

    # -- commands -----------------------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run one /command; False when the session should end."""
        name, _, rest = line.strip().partition(" ")
        name, rest = name.lower(), rest.strip()
        handlers = {"/remember": self.remember, "/forget": self.forget, "/jobs": self.jobs, "/why": self.why,
                    "/history": self.history, "/new": self.new, "/help": self.help}
        if name in ("/quit", "/exit", "/q"):
            return False
        handler = handlers.get(name)
        if handler is None:
            self.say(f"unknown command {name}: /help lists them", "red")
            return True
        try:
            handler(rest)
        except Missing as e:
            self.say(f"this server does not offer {e} (an older `localpers serve`)", "yellow")
        except UserError as e:
            self.say(f"error: {e}", "red")
        return True

    def help(self, _: str = "") -> None:
        from rich.table import Table

        table = Table(show_header=False, box=None)
        for command, what in COMMANDS.items():
            table.add_row(command, what)
        self.console.print(table)

    def new(self, _: str = "") -> None:
        self.new_conversation()
        self.say("new conversation")

    def remember(self, text: str) -> None:
        if not text:
            raise UserError("/remember needs the text to remember, e.g. /remember I'm vegetarian.")
        out = self.client.request("POST", self.client.user_url("/memories"),
                                  json={"text": text, "kind": names.PREFERENCE}).json()
        ids = [str(item["id"]) for item in out.get("data", [])]
        noted = noted_lines(text, out.get("facts", []))
        self.say(f"remembered (item {', '.join(ids)})" + (f"; noted: {', '.join(noted)}" if noted else ""), "green")

    def forget(self, _: str = "") -> None:
        from rich.markup import escape

        answer = self.console.input(escape(f"Forget everything held about {self.client.user}? [y/N] "))
        if answer.strip().lower() not in ("y", "yes"):
            self.say("kept")
            return
        try:
            self.client.request("DELETE", self.client.user_url())
        except NotFound:
            pass   # nothing was held
        self.new_conversation()
        self.say(f"forgot {self.client.user}: history, preferences and artifacts deleted", "green")

    def _items(self) -> list[dict]:
        response = self.client.request("GET", self.client.user_url("/memories"))
        return response.json().get("data", [])

    def history(self, _: str = "") -> None:
        from rich.table import Table

        try:
            items = self._items()
        except NotFound:
            items = []
        if not items:
            self.say(f"nothing held about {self.client.user}")
            return
        table = Table("id", "kind", "text", show_lines=False)
        for item in items:
            table.add_row(str(item.get("id")), str(item.get("kind", "")), str(item.get("text", "")))
        self.console.print(table)

    def _jobs(self) -> list[dict]:
        try:
            return self.client.request("GET", self.client.user_url("/jobs")).json().get("data", [])
        except NotFound:
            return []

    def jobs(self, _: str = "") -> None:
        from rich.table import Table

        jobs = self._jobs()
        if not jobs:
            self.say(f"no jobs for {self.client.user}")
            return
        table = Table("id", "kind", "state", "queued", "took", "detail")
        for row in job_rows(jobs, time.time()):
            table.add_row(*row)
        self.console.print(table)

    def watch_jobs(self) -> None:
        """After a reply: follow the user's unfinished jobs (a fact learned from the message queues one) and say
        "now in use" when one is done (its adapter serves the next reply), or why it failed."""
        try:
            jobs = self._jobs()
        except (UserError, Missing):
            return
        new = [j for j in jobs if j.get("state") in (names.QUEUED, names.RUNNING) and j.get("id") not in self._watched]
        if not new:
            return
        self._watched.update(j["id"] for j in new)
        threading.Thread(target=self._follow, args=([j["id"] for j in new],), daemon=True,
                         name="localpers-chat-jobs").start()

    def _follow(self, ids: list[int]) -> None:
        deadline = time.monotonic() + WATCH_S
        while ids and time.monotonic() < deadline:
            time.sleep(self.poll_s)
            try:
                jobs = {j["id"]: j for j in self._jobs()}
            except (UserError, Missing):
                return
            for job_id in list(ids):
                job = jobs.get(job_id)
                if job is None:  # forgotten meanwhile
                    ids.remove(job_id)
                elif job.get("state") == names.DONE:
                    ids.remove(job_id)
                    took = _duration(job.get("started"), job.get("finished"))
                    self.say(f"[learned: now in use — {job.get('kind')} job {job_id} done in {took}]", "green")
                elif job.get("state") == names.FAILED:
                    ids.remove(job_id)
                    self.say(f"[learning failed — {job.get('kind')} job {job_id}: {job.get('reason') or 'no reason'}]",
                             "yellow")

    def why(self, _: str = "") -> None:
        if not any(m["role"] == "assistant" for m in self.messages):
            self.say("no reply yet: ask something first")
            return
        e = self.explanation
        if not e and self.interrupted:
            self.say("the last reply was interrupted (Ctrl-C) before the server explained it: /why explains a "
                     "reply that ran to its end", "yellow")
            return
        if not e:
            self.say("the server did not explain the last reply (it does not support explanations: an older "
                     "`localpers serve`)", "yellow")
            return
        self.say(f"composition: {e.get('composition') or 'base'}", "bold")
        artifacts = e.get("artifacts") or []
        if artifacts:
            for a in artifacts:
                self.say(f"  {a.get('method')} {a.get('kind')} (artifact {a.get('id')})", "none")
        else:
            self.say("  no adapter or control vector for this question (none made for you yet, or none applies)",
                     "none")
        retrieved, stated = e.get("retrieved") or [], e.get("stated") or []
        texts = {}
        if retrieved or stated:
            try:
                texts = {item["id"]: item.get("text", "") for item in self._items()}
            except (UserError, Missing):
                pass
        if stated:
            self.say("  your stated facts, in a line before your question:", "none")
            for item_id in stated:
                self.say(f"    #{item_id} {texts.get(item_id, '')}".rstrip(), "none")
        if retrieved:
            self.say("  retrieved from your history:", "none")
            for item_id in dict.fromkeys(retrieved):  # each item once, whichever methods retrieved it
                self.say(f"    #{item_id} {texts.get(item_id, '')}".rstrip(), "none")
        else:
            self.say("  nothing retrieved from your history", "none")


def cmd_chat(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    from localpers.store.store import check_user

    user = getpass.getuser() if args.user is None else args.user   # an explicit --user "" is refused, not replaced
    if not user.strip():
        raise UserError("--user must not be empty")
    check_user(user)   # the server's rule, told before the first message
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    stop = None
    url = args.url
    if args.model:
        console.print(f"starting a server with {args.model} ...", style="dim", markup=False)
        url, stop = serve_in_thread(_app_for(args))
    try:
        client = Client(url, user, args.api_key)
        chat = Chat(client, console, max_tokens=args.max_tokens, temperature=args.temperature, system=args.system)
        client.request("GET", f"{client.url}/models")   # fail early, in one line, when nothing answers
        console.print(f"localpers chat as {user} on {url} — /help for commands, /quit to leave", style="dim",
                      markup=False)
        while True:
            try:
                line = console.input(f"[bold cyan]{escape(user)}>[/] ")
            except EOFError:
                console.print()
                break
            except KeyboardInterrupt:
                console.print()
                continue
            if not line.strip():
                continue
            if line.strip().startswith("/"):
                if not chat.command(line):
                    break
            else:
                chat.send(line)
    finally:
        if stop:
            stop()
    return 0
