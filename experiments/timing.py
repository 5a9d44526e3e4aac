"""Side-by-side timing shared by the benchmarks: interleaved rounds and same-round ratios
(this host is shared and noisy: a load that comes and goes falls on every variant alike)."""

import statistics
import time


def interleaved_times(fns: dict, rounds: int, reps: int, warmup: int) -> dict:
  """{name: [seconds per call, one per round]}: every function timed once per round, in turn,
  so that load on a shared machine falls on all of them alike."""
  import jax
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(reps):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / reps)
  return times


def paired(r, a, b, quartiles=False):
  """Median over rounds of (a's time / b's time in the same round); with quartiles, also the
  25th-75th percentile of those ratios."""
  ratios = [x / y for x, y in zip(r['rounds_ms'][a], r['rounds_ms'][b], strict=True)]
  text = f'{statistics.median(ratios):.2f}'
  if quartiles:
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    text += f' ({q1:.2f}-{q3:.2f})'
  return text
