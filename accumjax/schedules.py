"""How many micro-batches an update holds, when that changes during training.

- `KSchedule`: a fixed ramp, `parse_k_schedule("0:2,200:4,400:8")`: from the update after
  200 updates are done on, K = 4; from 400 on, K = 8.
- `auto_k`: K chosen from the measured gradient noise scale (B_simple, `core.noise_scale`): the
  effective batch follows the critical batch estimate, with hysteresis.

Every update is still exactly the big batch of its own micro-batches: the call driver
(`loop.run_update(num_microbatches=K)`) makes K / c calls and hints the last one, and
`LazyMultiSteps` ends the cycle there (or, unhinted, every `every_k(c)(gradient_step)` calls);
in scan mode a call of K micro-batches is one program per distinct K (the step is built for
the largest). `AccumConfig.lr_batch_scaling` makes the learning rate follow K.
"""

import math
from typing import NamedTuple

import jax.numpy as jnp

from accumjax.core import ConfigError


class KSchedule(NamedTuple):
  """Piecewise-constant K: `points` are (first update index, K), the first at update 0."""
  points: tuple[tuple[int, int], ...]

  def at(self, update: int) -> int:
    """K of the update that runs after `update` updates are done."""
    k = self.points[0][1]
    for start, value in self.points:
      if update >= start:
        k = value
    return k

  @property
  def max_k(self) -> int:
    return max(k for _, k in self.points)

  @property
  def ks(self) -> tuple[int, ...]:
    """The distinct K values, in order of first use (scan mode compiles one program each)."""
    return tuple(dict.fromkeys(k for _, k in self.points))

  def every_k(self, per_call: int):
    """`gradient_step -> calls per update`, for `LazyMultiSteps(every_k_schedule=...)` when the
    calls are not hinted (jnp, traceable)."""
    starts = jnp.array([s for s, _ in self.points])
    calls = jnp.array([k // per_call for _, k in self.points])
    return lambda step: calls[jnp.sum(step >= starts) - 1]

  def __str__(self):
    return ','.join(f'{s}:{k}' for s, k in self.points)


def parse_k_schedule(spec: str) -> KSchedule:
  """`"U:K,U:K,..."` (updates done, K from then on; starts at 0, increasing) -> KSchedule."""
  if not isinstance(spec, str) or not spec.strip():
    raise ConfigError(f'spec={spec!r}; allowed: "0:K0,U1:K1,..." e.g. '
                      '"0:2,200:4,400:8" (from update U on, K micro-batches per update).')
  points = []
  for part in spec.split(','):
    start, sep, k = part.strip().partition(':')
    if not sep or not start.strip().isdigit() or not k.strip().isdigit():
      raise ConfigError(f'spec={spec!r}: {part.strip()!r} is not U:K with '
                        'integers U >= 0 and K >= 1 (e.g. "0:2,200:4,400:8").')
    points.append((int(start), int(k)))
  if points[0][0] != 0:
    raise ConfigError(f'spec={spec!r} must start at update 0 (e.g. "0:2,...").')
  if any(b[0] <= a[0] for a, b in zip(points, points[1:], strict=False)):
    raise ConfigError(f'spec={spec!r}: the updates must increase.')
  if any(k < 1 for _, k in points):
    raise ConfigError(f'spec={spec!r}: every K must be >= 1.')
  return KSchedule(tuple(points))


def auto_k(b_simple: float, tokens_per_microbatch: float, current: int,
           allowed: tuple[int, ...]) -> int:
  """The K (from `allowed`) whose batch is nearest B_simple, with hysteresis.

  target = B_simple / tokens per micro-batch (B_simple in the same unit as the weights, e.g.
  real tokens). K stays at `current` while current / 2 <= target < 2 x current; outside that
  band it moves to the allowed K nearest the target on a log scale. A non-finite or
  non-positive B_simple (too early, too noisy) keeps `current`.
  """
  if not (math.isfinite(b_simple) and b_simple > 0 and tokens_per_microbatch > 0):
    return current
  target = b_simple / tokens_per_microbatch
  if current / 2 <= target < 2 * current:
    return current
  return min(allowed, key=lambda k: (abs(math.log(k / target)), k))
