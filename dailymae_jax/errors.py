"""The error every layer raises for a setting that cannot work (``main`` prints it as one line, exit code 2)."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is one line naming the key and what is allowed."""
