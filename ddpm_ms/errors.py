"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (data, config, checkpoint, paths): message says what is wrong and how to fix it."""
