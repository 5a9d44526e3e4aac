"""Memory planning from XLA's own accounting of a compiled step, no out-of-memory trials.

`compiled_memory` reads `jit(f).lower(...).compile().memory_analysis()` (abstract inputs:
nothing is allocated or run). `plan_trade` plans the whole trade, (micro-batch, remat policy,
K), with few compiles: per policy the step is compiled at two micro-batch sizes and memory is
fitted as a line in the micro-batch (a fixed part: state, gathered params, gradients; and a
part per row: activations); every candidate's time comes from a stated model
(`seconds_of`); the fastest that fits is compiled once more to check it.
"""

import dataclasses
import re
import time

import jax
import jax.numpy as jnp

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
  return memory_of(jitted.lower(*args, **kwargs).compile())


def memory_of(compiled) -> dict:
  """XLA's memory analysis of a compiled program (`jit(f).lower(...).compile()`): temp,
  argument, output and aliased bytes, and `total` = temp + arguments + outputs - aliased."""
  stats = compiled.memory_analysis()
  out = {'temp': stats.temp_size_in_bytes, 'argument': stats.argument_size_in_bytes,
         'output': stats.output_size_in_bytes, 'alias': stats.alias_size_in_bytes}
  out['total'] = out['temp'] + out['argument'] + out['output'] - out['alias']
  return out


@dataclasses.dataclass
class Candidate:
  """One (remat, micro-batch, K) the planner weighed, and its verdict ('chosen' or why not)."""
  remat: str
  microbatch_size: int
  num_microbatches: int
  predicted_bytes: int
  predicted_seconds: float
  verdict: str
  compiled_bytes: int | None = None


@dataclasses.dataclass
class TradePlan:
  remat: str
  microbatch_size: int
  num_microbatches: int
  predicted_bytes: int
  compiled_bytes: int
  predicted_seconds: float
  budget_bytes: int
  fits: dict  # remat -> [fixed bytes, bytes per micro-batch row] of the linear fit
  candidates: list  # Candidate, every one weighed
  compiles: int
  seconds: float  # the planning's own wall time


def describe_plan(plan: TradePlan) -> str:
  """The planner's choice and what it weighed, in one line."""
  return (f'budget {format_bytes(plan.budget_bytes)}: remat {plan.remat}, micro-batch '
          f'{plan.microbatch_size} x K {plan.num_microbatches}, predicted '
          f'{format_bytes(plan.predicted_bytes)}, compiled {format_bytes(plan.compiled_bytes)}, '
          f'~{plan.predicted_seconds:.3g} s per update (model); {plan.compiles} compiles in '
          f'{plan.seconds:.0f} s. Weighed: ' + '; '.join(
              f'{c.remat} b={c.microbatch_size} K={c.num_microbatches}: {c.verdict}'
              for c in plan.candidates))


def _sizes(rows: int | None, limit: int) -> list[int]:
  if rows is not None:
    return [b for b in range(1, rows + 1) if rows % b == 0]
  return list(range(1, limit + 1))


def plan_trade(step_memory, budget_bytes: int, seconds_of, remats, *, rows: int | None = None,
               num_microbatches: int | None = None, probes=(1, 2),
               max_microbatch: int = 4096) -> TradePlan:
  """The fastest (remat, micro-batch b, K) whose compiled step fits `budget_bytes`.

  Args:
    step_memory: `(b, k, remat) -> compiled bytes` of the real step (per device).
    budget_bytes: the budget per device.
    seconds_of: `(b, k, remat) -> predicted seconds per update` (a stated time model).
    remats: the remat policies to weigh.
    rows: rows per update per device (b x K): b divides it, K = rows / b. Or:
    num_microbatches: K fixed (a K schedule's largest K); b from 1 to `max_microbatch`, and the
      time compared per row.
    probes: the two micro-batch sizes compiled per policy for the linear fit.

  Every policy gets its largest fitting b (predicted), and the next size up is listed as over
  the budget; the fastest is compiled to check it, and stepped down while it does not fit.
  """
  if (rows is None) == (num_microbatches is None):
    raise ConfigError('plan_trade needs one of rows= or num_microbatches=.')
  start, compiles = time.perf_counter(), 0
  k_of = (lambda b: rows // b) if rows is not None else (lambda b: num_microbatches)
  fits, pool, candidates = {}, [], []
  for remat in remats:
    probe_k = lambda b: num_microbatches if rows is None else max(1, rows // b)
    (b1, m1), (b2, m2) = [(b, step_memory(b, probe_k(b), remat)) for b in probes]
    compiles += 2
    slope = (m2 - m1) / (b2 - b1)
    fixed = m1 - slope * b1
    fits[remat] = [int(fixed), int(slope)]
    predict = lambda b, fixed=fixed, slope=slope: int(fixed + slope * b)
    sizes = _sizes(rows, max_microbatch)
    fitting = [b for b in sizes if predict(b) <= budget_bytes]
    above = [b for b in sizes if predict(b) > budget_bytes and (not fitting or b > fitting[-1])]
    if above:  # the next size up, over the budget
      b = above[0]
      candidates.append(Candidate(remat, b, k_of(b), predict(b), seconds_of(b, k_of(b), remat),
                                  f'over budget: {format_bytes(predict(b))} predicted'))
    if fitting:
      pool.append((remat, fitting, predict))
  while pool:
    per = lambda item: seconds_of(item[1][-1], k_of(item[1][-1]), item[0]) / (
        1 if rows is not None else item[1][-1])
    pool.sort(key=per)
    remat, fitting, predict = pool[0]
    b = fitting[-1]
    compiled = int(step_memory(b, k_of(b), remat))
    compiles += 1
    cand = Candidate(remat, b, k_of(b), predict(b), seconds_of(b, k_of(b), remat), 'chosen',
                     compiled)
    if compiled <= budget_bytes:
      for other_remat, other, other_predict in pool[1:]:
        ob = other[-1]
        candidates.append(Candidate(
            other_remat, ob, k_of(ob), other_predict(ob), seconds_of(ob, k_of(ob), other_remat),
            f'fits, not faster: {seconds_of(ob, k_of(ob), other_remat):.3g} s vs the choice\'s '
            f'{cand.predicted_seconds:.3g} s' + (' per update' if rows is not None else '')))
      candidates.append(cand)
      return TradePlan(remat, b, k_of(b), cand.predicted_bytes, compiled,
                       cand.predicted_seconds, budget_bytes, fits, candidates, compiles,
                       time.perf_counter() - start)
    cand.verdict = f'compiled {format_bytes(compiled)} is over the budget'
    candidates.append(cand)
    pool[0] = (remat, fitting[:-1], predict)
    pool = [p for p in pool if p[1]]
  raise ConfigError(
      f'budget_bytes={format_bytes(budget_bytes)} is too small: even a micro-batch of 1 row '
      f'needs ' + ', '.join(f'{format_bytes(f[0] + f[1])} ({r})' for r, f in fits.items()) +
      ' (predicted from compiled steps).')


def measure_rates(compute_dtype=jnp.float32, size: int = 1024, reps: int = 5) -> dict:
  """This device's matmul rate in `compute_dtype` (FLOP/s: a jitted size x size matmul, the
  median of `reps`) and the fixed cost of one micro-batch of the scan (seconds: a scan of 17
  tiny micro-batches minus one of 1, per micro-batch). The time model's two constants."""
  a = jnp.ones((size, size), compute_dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - t)
  rate = 2 * size ** 3 / sorted(times)[reps // 2]

  body = lambda c, x: (c + jnp.tanh(x @ jnp.ones((8, 8))).sum(), None)
  per = []
  for n in (1, 17):
    f, xs = jax.jit(lambda xs: jax.lax.scan(body, 0.0, xs)[0]), jnp.ones((n, 4, 8))
    f(xs).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
      f(xs).block_until_ready()
    per.append((time.perf_counter() - t) / reps)
  return {'flops_per_second': rate, 'seconds_per_microbatch': max(per[1] - per[0], 0.0) / 16}


def transformer_flops_per_token(params_nonembedding: int, num_layers: int, d_model: int,
                                seq_len: int, remat: str) -> float:
  """Training FLOPs per token: 6 N (forward 2 N, backward 4 N) plus attention's 12 L d T
  (Kaplan et al. 2020), and under remat 'full' the forward once more (2 N + 4 L d T); 'dots'
  recomputes only element-wise work."""
  forward = 2 * params_nonembedding + 4 * num_layers * d_model * seq_len
  return 3 * forward + (forward if remat == 'full' else 0)


def time_model(flops_per_token, tokens_per_row: int, rates: dict):
  """`(b, k, remat) -> seconds per update` = K x the micro-batch's fixed cost + the update's
  FLOPs / the device's rate (`measure_rates`). `flops_per_token(remat)`."""
  def seconds_of(b, k, remat):
    return k * rates['seconds_per_microbatch'] + (
        b * k * tokens_per_row * flops_per_token(remat) / rates['flops_per_second'])
  return seconds_of

