"""Errors meant for users: the CLI prints their message as one line and exits with code 2."""


class FimtuneError(Exception):
    """A problem with the user's input (a path, a field, a value) that they can fix."""


class ConfigError(FimtuneError):
    """An unknown key, a wrong type or an unreadable config file."""


class DataError(FimtuneError):
    """A source, file or dataset that cannot be used as given."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `docker stop`, a scheduler taking the machine back) during a command that
    ends on it as on Ctrl-C: with what it kept said, and exit code 143 rather than 130."""
