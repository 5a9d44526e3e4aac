"""Fault drills for the trainer (`--inject-faults U:J[:V]`): a chosen micro-batch's loss times
V (NaN, Inf, or a large factor), to exercise the non-finite policies on a real run.

The drill travels in the data: each row of a call batch carries a `fault` factor, and
`with_faults` wraps the loss to multiply the micro-batch's loss sum by the mean factor of its
rows. A run without faults uses the plain loss (the same compiled program as before drills
existed).
"""

import jax.numpy as jnp
import numpy as np

from accumjax.core import ConfigError


def parse(spec: str | None, num_microbatches: int) -> dict[tuple[int, int], float]:
  """'U:J[:V],...' -> {(update U, micro-batch J): V}.

  U counts updates from 1 (as the log does), J micro-batches of the cycle from 0 (as the
  'raise' message does). V (default nan) multiplies that micro-batch's loss sum: nan, inf,
  -inf, or a finite factor (a large one, e.g. 1e6, overflows float16 only once scaled).
  """
  if spec is None:
    return {}
  faults = {}
  for item in spec.split(','):
    parts = item.strip().split(':')
    try:
      if len(parts) not in (2, 3):
        raise ValueError
      u, j = int(parts[0]), int(parts[1])
      v = float(parts[2]) if len(parts) == 3 else float('nan')
    except ValueError:
      raise ConfigError(
          f'--inject-faults {spec!r}: {item!r} is not UPDATE:MICROBATCH[:VALUE] '
          '(e.g. 3:1:nan, 5:0:inf, 7:2:1e6).') from None
    if u < 1 or not 0 <= j < num_microbatches:
      raise ConfigError(
          f'--inject-faults {spec!r}: {item!r} needs UPDATE >= 1 and 0 <= MICROBATCH < '
          f'{num_microbatches} (K).')
    faults[(u, j)] = v
  return faults


def rows(faults: dict, update: int, first_microbatch: int, num_microbatches: int,
         microbatch_size: int) -> np.ndarray:
  """The per-row `fault` factors of one call (1.0 except the injected micro-batches)."""
  out = np.ones((num_microbatches, microbatch_size), np.float32)
  for i in range(num_microbatches):
    out[i] = faults.get((update, first_microbatch + i), 1.0)
  return out.reshape(-1)


def with_faults(loss_fn):
  """`loss_fn` whose loss sum is multiplied by the mean `fault` of the micro-batch's rows."""

  def faulty(params, batch, rng):
    rest = {k: v for k, v in batch.items() if k != 'fault'}
    loss_sum, weight = loss_fn(params, rest, rng)[:2]
    return loss_sum * jnp.mean(batch['fault']), weight

  return faulty
