class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file's content). The CLI prints it as one line,
    without a traceback, and exits with status 2; the server answers it with a 4xx."""


def check_choice(what: str, value: str, known) -> str:
    """`value` if it is one of `known` (a closed vocabulary: kinds, modes, methods, tasks), else a UserError
    naming the closest known values (difflib) and listing them all."""
    import difflib

    known = list(known)
    if value in known:
        return value
    close = difflib.get_close_matches(value, known, n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UserError(f"unknown {what} {value!r}: {hint}(known: {', '.join(known)})")


def port_number(text: str) -> int:
    """An argparse `type` for a TCP port: 1..65535, else a one-line error naming the value."""
    import argparse

    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port
