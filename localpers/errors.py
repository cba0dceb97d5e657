class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file's content). The CLI prints it as one line,
    without a traceback, and exits with status 2; the server answers it with a 4xx."""
