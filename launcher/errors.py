"""The one error type the CLI turns into a one-line message and exit code 2."""


class ConfigError(Exception):
    """A bad config value, found before any process starts; the message names it."""
