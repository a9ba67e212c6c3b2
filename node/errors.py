"""Errors that the CLI turns into one line on stderr and a non-zero exit."""


class UsageError(Exception):
    """Bad flags, config values or input files: the message says what is wrong and how to fix it."""
