"""One declaration per setting: a dataclass field that carries its flag, help, choices and check.

`setting(default, help, ...)` is a `dataclasses.field` whose metadata says everything else
about the setting: its command-line flag (default `--name-with-dashes`), its choices (the
library's own constants), the smallest int it takes or a check with the words of its
refusal, what a resumed run may do with it (`on_resume`), and its name in checkpoints
(`flat`, where it differs). `check(cfg)` validates every setting of a config from these, once
(`AccumConfig` checks its own at construction, naming its arguments; the LM's `TrainConfig`
and `ModelConfig` name their flags); `experiments/train.py` builds its argument parser from
them. A new setting is one field.

Not here: checks that involve several settings (the configs' own), argument parsing.
"""

import dataclasses
import math
import typing

from accumjax.errors import ConfigError

# What a resumed run may do with a setting (see lm/resume.py): change it freely ('harmless':
# it only changes what is logged or saved, or the fault policy), change it at a cycle
# boundary ('accumulation': the shape of an update), or never (None: it changes the math).
ON_RESUME = ('harmless', 'accumulation', None)


def setting(default, help: str, *, group: str, flag: str | None = None, choices=None,  # noqa: A002
            minimum: int | None = None, check=None, on_resume: str | None = None,
            flat: str | None = None, parse=None, metavar: str | None = None,
            words: dict | None = None):
  """A dataclass field declaring one setting (see the module docstring).

  Args:
    default: the default value.
    help: the one-line help of its flag.
    group: the --help section.
    flag: the command-line flag (default: `--` + the name with dashes).
    choices: the allowed values (a tuple; refused otherwise).
    minimum: for an int setting, the smallest allowed (None: not an int check).
    check: `(predicate, words)`: a value for which predicate is false is refused as
      `{flag} {value!r} {words}` (None values are accepted when the default is None).
    on_resume: one of ON_RESUME.
    flat: the name in checkpoints and config.json, where it differs from the field's.
    parse: the flag's argparse `type` (default: the type of the default; `str` for None).
    metavar: the flag's metavar.
    words: the flag's words for the values, where they differ (`{'fp32': 'float32'}`): the
      flag takes the words, checkpoints and config.json store them.
  """
  if on_resume not in ON_RESUME:
    raise ValueError(f'on_resume={on_resume!r}; allowed: {ON_RESUME}')
  meta = dict(help=help, group=group, flag=flag, choices=choices, minimum=minimum, check=check,
              on_resume=on_resume, flat=flat, parse=parse, metavar=metavar, words=words)
  return dataclasses.field(default=default, metadata={'setting': meta})


def to_word(field: dataclasses.Field, value):
  """A value as its flag says it (`'float32'` -> `'fp32'` for --precision)."""
  words = field.metadata['setting']['words'] or {}
  return next((w for w, v in words.items() if v == value), value)


def from_word(field: dataclasses.Field, value):
  """The inverse of `to_word` (a value that is no word is kept as it is)."""
  return (field.metadata['setting']['words'] or {}).get(value, value) \
      if isinstance(value, str) else value


def settings_of(cls) -> list[tuple[dataclasses.Field, dict]]:
  """(field, its setting metadata) for every declared setting of a dataclass."""
  return [(f, f.metadata['setting']) for f in dataclasses.fields(cls) if 'setting' in f.metadata]


def flag_of(field: dataclasses.Field) -> str:
  return field.metadata['setting']['flag'] or '--' + field.name.replace('_', '-')


def flat_name(field: dataclasses.Field) -> str:
  return field.metadata.get('setting', {}).get('flat') or field.name


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def finite_number(ok):
  """A check predicate: a finite real number for which `ok` holds."""
  return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and ok(v))


def check(cfg, as_argument: bool = False) -> None:
  """Refuses the first setting of `cfg` (a dataclass of settings) that its declaration does
  not allow, naming the flag (or, `as_argument`, the library argument: `mode='x'`); nested
  dataclasses of settings are checked too, unless they check themselves at construction
  (`CHECKED_AT_INIT`)."""
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if dataclasses.is_dataclass(value):
      if not getattr(value, 'CHECKED_AT_INIT', False):
        check(value, as_argument)
      continue
    meta = field.metadata.get('setting')
    if meta is None or (value is None and type(None) in typing.get_args(field.type)):
      continue
    said = f'{field.name}={value!r}' if as_argument else f'{flag_of(field)} {value!r}'
    if isinstance(field.default, bool) and not isinstance(value, bool):
      raise ConfigError(f'{said} must be {"True or False" if as_argument else "true or false"}.')
    if meta['minimum'] is not None and (not is_int(value) or value < meta['minimum']):
      raise ConfigError(f'{said} must be an integer >= {meta["minimum"]}.')
    if meta['choices'] is not None and (not isinstance(value, str) or
                                        value not in meta['choices']):
      allowed = meta['choices'] if as_argument else [to_word(field, c) for c in meta['choices']]
      raise ConfigError(f'{said}; allowed: {", ".join(allowed)}.')
    if meta['check'] is not None and not meta['check'][0](value):
      raise ConfigError(f'{said} {meta["check"][1]}')
