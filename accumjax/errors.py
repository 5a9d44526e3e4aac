"""The error accumjax raises for a bad setting or input, before any computation."""


class ConfigError(ValueError):
  """A bad accumulation setting or input, detected before any computation. The message names
  the library argument and what is allowed (the CLI translates it to its flags)."""
