"""Errors the user can fix. The CLI prints them as one line and exits with their code."""


class UserError(Exception):
    """A mistake in the user's input: bad arguments, files, params or tasks."""

    exit_code = 2
