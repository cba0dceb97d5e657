"""What keeps one client from taking the server from the others, and client input from reaching a 500.

- `authorized(header, key)`: the Authorization header carries the API key (scheme case-insensitive, RFC 7235;
  compared in constant time).
- `check_text(value, where)`: a 400 naming the field for a string that is not valid Unicode text (a lone
  surrogate such as "\\ud800", which JSON's escapes allow and UTF-8 cannot encode); `printable(message)` makes
  any message safe to send.
- `check_work(n, max_tokens, n_ctx, limit)`: the work of one request, n choices x the tokens each may generate
  (at most the context), is capped at `limit` tokens (names.MAX_REQUEST_TOKENS, `serve --max-request-tokens`).
- `bounded_protocol(...)`: uvicorn's h11 protocol with deadlines for receiving a request (headers within
  `header_timeout` s, then the body within `body_timeout` s: a slow or silent client is disconnected) and a
  connection cap below the descriptor limit (`connection_cap`: the soft RLIMIT_NOFILE less names.FD_RESERVE
  descriptors kept for the job worker, the model and the database). Over the cap, the oldest connection still
  sending its request is closed to make room; with none, the newcomer gets a 503.
"""
from __future__ import annotations

import hmac
import logging

from localpers import names

log = logging.getLogger(__name__)


def authorized(header: str | None, key: str) -> bool:
    """Whether an Authorization header value is "Bearer KEY" (any case of the scheme, RFC 7235 section 2.1)."""
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode("utf-8", "replace"),
                                                              key.encode("utf-8", "replace"))


def printable(message: str) -> str:
    """`message` with any lone surrogate written as its escape (\\udXXX), so that it encodes as UTF-8."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_text_at(value, where: str = "") -> str | None:
    """The path ("messages.0.content", "model") of the first string in a JSON-like value that is not valid Unicode
    text (a lone surrogate), or None. Dict keys are checked too."""
    stack = [(value, where)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return at or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                if bad_text_at(k, at) is not None:
                    return f"{at}.{printable(str(k))}".lstrip(".")
                stack.append((v, f"{at}.{k}".lstrip(".")))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{at}.{i}".lstrip(".")) for i, v in enumerate(value))
    return None


def check_work(n: int, max_tokens: int, n_ctx: int | None, limit: int, what: str = "n") -> str | None:
    """A refusal message when n choices x min(max_tokens, n_ctx) tokens exceed `limit`, else None; `what` names
    the choices ("n", or "n x prompts" for several completion prompts)."""
    per_choice = max_tokens if n_ctx is None else min(max_tokens, n_ctx)
    if n * per_choice > limit:
        return (f"{what} x max_tokens is {n} x {per_choice} = {n * per_choice} tokens (max_tokens counted up to the "
                f"context), over this server's limit of {limit} tokens per request; lower 'n' or 'max_tokens' "
                f"(the server's --max-request-tokens sets the limit)")
    return None


# -- slow clients ----------------------------------------------------------------------------------------------

def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit (bounded at 1 << 16); returns the soft limit."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard if hard != resource.RLIM_INFINITY else 1 << 16, 1 << 16)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(soft_limit: int, reserve: int = names.FD_RESERVE) -> int:
    """Connections the server holds at most: the descriptor limit less the reserve (at least 8)."""
    return max(8, soft_limit - reserve)


def bounded_protocol(max_connections: int, header_timeout: float = names.HEADER_TIMEOUT_S,
                     body_timeout: float = names.BODY_TIMEOUT_S):
    """uvicorn's H11Protocol with receive deadlines and a connection cap (module docstring); pass it as
    uvicorn.Config(http=...)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.opened = self.loop.time()
            if len(self.connections) > max_connections and not self._make_room():
                log.warning("connection refused: %d connections is the cap", max_connections)
                transport.write(_BUSY)
                transport.close()
                return
            self._arm_header_deadline()

        def receiving(self) -> bool:
            """Still sending its request: no request yet (or waiting for the next one), or a body not complete."""
            cycle = self.cycle
            return cycle is None or cycle.response_complete or cycle.more_body

        def _make_room(self) -> bool:
            """Close the oldest other connection that is still sending its request; False when none is."""
            others = [c for c in self.connections if c is not self and getattr(c, "opened", None) is not None
                      and c.receiving() and not c.transport.is_closing()]
            if not others:
                return False
            oldest = min(others, key=lambda c: c.opened)
            log.warning("closing a connection still sending its request to make room (cap %d)", max_connections)
            oldest.transport.close()
            oldest.connections.discard(oldest)
            return True

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_deadline()

        def _arm_header_deadline(self):
            armed = self.cycle

            def check():
                if self.transport.is_closing():
                    return
                if self.cycle is armed and (armed is None or armed.response_complete):
                    self.transport.close()  # no (next) request's headers in time
                elif self.cycle is not None and self.cycle.more_body:
                    self._arm_body_deadline(self.cycle)
            self.loop.call_later(header_timeout, check)

        def _arm_body_deadline(self, cycle):
            def check():
                if not self.transport.is_closing() and self.cycle is cycle and cycle.more_body:
                    self.transport.close()  # the app's receive() then sees http.disconnect
            self.loop.call_later(body_timeout, check)

    return BoundedH11Protocol


_BUSY_BODY = b'{"error":{"message":"the server is at its connection limit","type":"server_error","code":"busy"}}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
         b"content-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
