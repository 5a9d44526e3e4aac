"""Memory planning from XLA's own accounting of a compiled step, no out-of-memory trials.

`compiled_memory` reads `jit(f).lower(...).compile().memory_analysis()`. `plan_microbatch`
walks micro-batch sizes from the largest down, compiles the real train step for each (with
abstract inputs: nothing is allocated or run), and keeps the largest whose compiled memory
fits the budget; K then follows from the effective batch.
"""

import dataclasses
import re

import jax

from accumjax.core import ConfigError

_UNITS = {'': 1, 'b': 1, 'k': 1e3, 'kb': 1e3, 'kib': 2**10, 'm': 1e6, 'mb': 1e6, 'mib': 2**20,
          'g': 1e9, 'gb': 1e9, 'gib': 2**30, 't': 1e12, 'tb': 1e12, 'tib': 2**40}


def parse_bytes(text: str) -> int:
  """'2GiB' -> 2147483648; also 512MiB, 1.5GB, 1000000."""
  m = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*', str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise ConfigError(f'memory size {text!r} not understood; use e.g. 2GiB, 512MiB, 1.5GB.')
  value = float(m.group(1)) * _UNITS[m.group(2).lower()]
  if value <= 0:
    raise ConfigError(f'memory size {text!r} must be positive.')
  return int(value)


def format_bytes(n: float) -> str:
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(n) >= size:
      return f'{n / size:.2f} {unit}'
  return f'{n:.0f} B'


def compiled_memory(fn, *args, **kwargs) -> dict:
  """XLA's memory analysis of `fn` (jitted or not) compiled for `args` (arrays or
  ShapeDtypeStructs) and `kwargs` (e.g. a static `last_call`). `total` = temp + arguments +
  outputs - aliased (donated) bytes."""
  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
  out = {'temp': stats.temp_size_in_bytes, 'argument': stats.argument_size_in_bytes,
         'output': stats.output_size_in_bytes, 'alias': stats.alias_size_in_bytes}
  out['total'] = out['temp'] + out['argument'] + out['output'] - out['alias']
  return out


@dataclasses.dataclass
class Plan:
  microbatch_size: int
  num_microbatches: int
  predicted_bytes: int
  budget_bytes: int
  tried: list[tuple[int, int]]  # (micro-batch size, compiled total bytes), largest first


def plan_microbatch(step_memory, budget_bytes: int, effective_batch: int) -> Plan:
  """Largest micro-batch size b dividing `effective_batch` whose step fits `budget_bytes`.

  Args:
    step_memory: `(microbatch_size, num_microbatches) -> compiled bytes` of the real step.
    budget_bytes: memory budget.
    effective_batch: rows per optimizer update (micro-batch x K).
  """
  tried = []
  for b in sorted((d for d in range(1, effective_batch + 1) if effective_batch % d == 0),
                  reverse=True):
    k = effective_batch // b
    need = int(step_memory(b, k))
    tried.append((b, need))
    if need <= budget_bytes:
      return Plan(b, k, need, budget_bytes, tried)
  raise ConfigError(
      f'budget_bytes={format_bytes(budget_bytes)} is too small: even a micro-batch of 1 '
      f'row needs {format_bytes(tried[-1][1])} (compiled step, K={effective_batch}).')
