"""The error accumjax raises for a bad setting or input, before any computation."""


class ConfigError(ValueError):
  """A bad accumulation setting or input, detected before any computation. The message names
  the library argument and what is allowed (the CLI translates it to its flags)."""


def check_int(name: str, value, minimum: int = 1, optional: bool = False) -> None:
  """Refuses anything but an int >= `minimum` (None too, if `optional`); a bool is no int."""
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f'{name}={value!r} must be an int >= {minimum}'
                      + (' (or None).' if optional else '.'))


def check_bool(name: str, value) -> None:
  """Refuses anything but True or False (a truthy string would pass an `if`)."""
  if not isinstance(value, bool):
    raise ConfigError(f'{name}={value!r} must be True or False.')
