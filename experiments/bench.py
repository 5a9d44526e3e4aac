"""What accumulation costs: time and memory of every mode vs K at a fixed effective batch.

    python -m experiments.bench            # ~15 minutes on 2 CPU cores (3.3M-param LM, fp32)
    python -m experiments.bench --quick    # ~2 minutes, a tiny model (CI smoke)
    python -m experiments.bench --lazy     # ~2 minutes: one call's optimizer side, per path
    python -m experiments.bench --noise    # ~3 minutes: the cost of noise statistics at K=8
    python -m experiments.bench --core     # ~3 minutes: the core vs a hand-written scan
    python -m experiments.bench --emit     # ~4 minutes: the completing step vs plain optax

Each (variant, K) cell runs in its own subprocess (so peak process memory is its own), on the
same packed real-text batch: full batch (K=1), scan, multisteps with optax.MultiSteps as
shipped, multisteps with accumjax's LazyMultiSteps, hybrid (c = K/2), and
optax.microbatching.microbatch as an outside reference. Per cell: median time per optimizer
update (after a warm-up, device synchronised), tokens/s, XLA's compiled memory (temp +
arguments + outputs - aliased), peak RSS, and the number of compilations of the step. Ratios
against the targets of issue 5 are printed and written, with the command, to
benchmarks/RESULTS.md (quick runs: benchmarks/RESULTS-quick.md) with a PNG plot.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

from experiments.timing import interleaved_times as _interleaved_times
from experiments.timing import paired as _paired

ROOT = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = ('full', 'scan', 'multisteps_optax', 'multisteps_lazy', 'hybrid', 'optax_microbatch')
SIZES = {
    'default': dict(d_model=256, num_layers=4, num_heads=4, seq_len=128, batch=32,
                    ks=(1, 2, 4, 8, 16, 32), reps=5),
    'quick': dict(d_model=64, num_layers=2, num_heads=2, seq_len=64, batch=16, ks=(1, 4),
                  reps=3),
}


def _rss_bytes():
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) * 1024
  return 0


def _median_time(fn, reps, warmup=1):
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _setup(size: str):
  """(loss_fn, AdamW, params, the packed real-text batch) of the main bench at `size`."""
  import jax
  import optax

  from accumjax.lm import data, model
  from accumjax.lm.build import make_loss_fn

  s = SIZES[size]
  train_split, _ = data.load_splits(None, s['seq_len'], pack=True)
  batch = jax.device_put(data.RowIterator(train_split, 0).next_rows(s['batch']))
  apply, params = model.make_lm(model.ModelConfig(
      d_model=s['d_model'], num_layers=s['num_layers'], num_heads=s['num_heads'],
      max_len=s['seq_len']))
  return make_loss_fn(apply), optax.adamw(1e-3), params, batch


def _updater(variant, k, size, loss_fn, inner, params, batch, out):
  """(one update, its jitted step, calls per update) of a (variant, K) cell; its compiled
  memory (and, for multisteps, the interim call's cost) into `out`."""
  if variant == 'optax_microbatch':
    return _optax_microbatch_cell(loss_fn, inner, params, batch, k, out)
  return _accumjax_cell(variant, loss_fn, inner, params, batch, k, SIZES[size], out)


def run_cell(variant: str, k: int, size: str) -> dict:
  """One (variant, K) cell's memory, in this process (its own, so that the peak RSS is the
  cell's): XLA's compiled memory, peak RSS over a few updates, compilations."""
  from accumjax.lm import model

  s = SIZES[size]
  loss_fn, inner, params, batch = _setup(size)
  rss_before = _rss_bytes()
  out = {'variant': variant, 'k': k, 'num_params': model.num_params(params),
         'tokens_per_update': s['batch'] * s['seq_len']}
  one_update, step, calls = _updater(variant, k, size, loss_fn, inner, params, batch, out)
  _median_time(one_update, 2)  # (warm-up + 2 updates: the peak RSS of running it)
  out.update(
      calls_per_update=calls,
      compilations=step._cache_size(),  # multisteps/hybrid: interim + last-call programs
      peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      rss_before=rss_before)
  return out


def side_by_side(size: str, cells, rounds: int) -> dict:
  """Seconds per update of every (variant, K) cell, and of the scan cells' parts (one
  micro-batch's gradient, the optimizer step), all in this one process, timed in interleaved
  rounds: {name: [seconds, one per round]}. A ratio of two of them is then taken round by
  round (this host is shared and noisy)."""
  import jax
  import jax.numpy as jnp

  import accumjax

  loss_fn, inner, params, batch = _setup(size)
  runners = {}
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # (every cell donates its own state)
  for variant, k in cells:
    runners[(variant, k)] = _updater(variant, k, size, loss_fn, inner, copy(params), batch,
                                     None)[0]
  grad_one = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]))
  for k in sorted({k for _, k in cells}):
    mb0 = jax.tree.map(lambda x: x[0], accumjax.split_microbatches(batch, k))
    runners[('microbatch grad', k)] = lambda mb0=mb0: grad_one(params, mb0)
  runners[('optimizer step', 1)] = _optimizer_step(loss_fn, inner, copy(params), batch)
  return _interleaved_times(runners, rounds, reps=1, warmup=1)


def _optax_microbatch_cell(loss_fn, inner, params, batch, k, out):
  """optax.microbatching.microbatch as an outside reference: (one update, its jitted step,
  calls per update); its compiled memory into `out`."""
  import jax
  import jax.numpy as jnp
  import optax

  from accumjax import planner
  mb = jax.tree.leaves(batch)[0].shape[0] // k
  grad_sums = optax.microbatching.microbatch(
      jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0]), argnums=1, microbatch_size=mb)
  weight = jnp.sum(batch['mask'])

  def update(params, opt_state, batch):
    _, g = grad_sums(params, batch)
    g = jax.tree.map(lambda x: x / weight, g)
    u, opt_state = inner.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state

  step = jax.jit(update, donate_argnums=(0, 1))
  holder = [(params, inner.init(params))]
  if out is not None:
    out['memory'] = planner.compiled_memory(step, *holder[0], batch)

  def one_update():
    holder[0] = step(*holder[0], batch)
    return holder[0]
  return one_update, step, 1


def _update(holder, step, call_batches, config):
  import accumjax
  holder[0] = accumjax.run_update(step, holder[0], call_batches, config).state
  return holder[0]


def _accumjax_cell(variant, loss_fn, inner, params, batch, k, s, out):
  """accumjax in `variant`'s mode: (one update, its jitted step, calls per update); its
  compiled memory, and for multisteps the interim call's cost, into `out` (None: neither)."""

  import accumjax
  from accumjax import planner
  rows, seq = s['batch'], s['seq_len']
  mode = {'full': 'scan', 'scan': 'scan', 'hybrid': 'hybrid'}.get(variant, 'multisteps')
  config = accumjax.AccumConfig(
      num_microbatches=1 if variant == 'full' else k,
      microbatch_size=rows if variant == 'full' else rows // k, mode=mode,
      microbatches_per_call=max(1, k // 2) if mode == 'hybrid' else None, seq_len=seq,
      multisteps_impl='optax' if variant == 'multisteps_optax' else 'lazy')
  tx = accumjax.accumulating_optimizer(inner, config)
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config))
  call_batches = accumjax.loop.split_calls(batch, config)
  holder = [accumjax.init_train_state(params, tx, 0)]
  if out is None:  # (side_by_side: the update alone)
    return lambda: _update(holder, step, call_batches, config), step, len(call_batches)
  out['memory'] = planner.compiled_memory(step, holder[0], call_batches[0],
                                          last_call=len(call_batches) == 1)

  def one_update():
    return _update(holder, step, call_batches, config)

  if variant in ('multisteps_optax', 'multisteps_lazy') and k > 1:
    out.update(_interim_cost(loss_fn, tx, config, params, call_batches[0], holder[0], s))
  return one_update, step, len(call_batches)


def _optimizer_step(loss_fn, inner, params, batch):
  """A call of the completing program's optimizer side alone (`step.apply_cycle` in scan
  mode, the state donated), one micro-batch's sums given as an argument."""
  import jax
  import jax.numpy as jnp

  import accumjax
  from accumjax import step as step_lib
  config = accumjax.AccumConfig(num_microbatches=1, microbatch_size=1)
  tx = accumjax.accumulating_optimizer(inner, config)
  mb = jax.tree.map(lambda x: x[:1], batch)
  sums, _ = accumjax.accumulate_sums(loss_fn, params, mb, num_microbatches=1)
  cycle = lambda s: step_lib.Cycle(s, jnp.ones((), jnp.int32), jnp.full((), -1, jnp.int32))
  opt_step = jax.jit(lambda st, s: step_lib.apply_cycle(tx, config, st, s, cycle(s))[0],
                     donate_argnums=0)
  holder = [accumjax.init_train_state(params, inner, 0, config)]

  def call():
    holder[0] = opt_step(holder[0], sums)
    return holder[0]
  return call


def _interim_cost(loss_fn, tx, config, params, call_batch, state, s) -> dict:
  """The optimizer side of an interim call (sums given), chained with donation as in
  training, vs a bare float32 add of a gradient-sized tree into a donated accumulator: the
  own cycle's add (lazy) or optax.MultiSteps' update (optax)."""
  import jax
  import jax.numpy as jnp

  import accumjax
  from accumjax import optim
  from accumjax import step as step_lib
  sums, _ = accumjax.accumulate_sums(loss_fn, params, call_batch, num_microbatches=1)
  if config.multisteps_impl == 'lazy':
    interim = jax.jit(lambda c, sm: step_lib.add_to_cycle(c, sm, 1), donate_argnums=0)
    chain = [jax.tree.map(jnp.zeros_like, state.cycle)]
  else:
    interim = jax.jit(lambda st, sm: tx.update(sm, st, optim.as_opt_params(params))[1],
                      donate_argnums=0)
    chain = [jax.tree.map(jnp.copy, state.opt_state)]
  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
  acc = [jax.tree.map(jnp.zeros_like, sums.grads)]

  def interim_call():
    chain[0] = interim(chain[0], sums)
    return chain[0]

  def add_call():
    acc[0] = add(acc[0], sums.grads)
    return acc[0]

  # interleaved rounds; the ratio is the median of the per-round ratios (a noisy host)
  times = _interleaved_times({'interim': interim_call, 'add': add_call}, rounds=21,
                             reps=max(5, s['reps'] * 2), warmup=3)
  return {'interim_optimizer_s': statistics.median(times['interim']),
          'bare_add_s': statistics.median(times['add']),
          'interim_ratio': statistics.median(
              a / b for a, b in zip(times['interim'], times['add'], strict=True))}


# (label, model dims, rounds, calls per round): many short rounds where a call is short, so
# that the per-round ratios (each variant against its reference, timed in the same round)
# have a stable median on a shared, noisy host
LAZY_SIZES = {
    'default': [('0.9M', dict(d_model=128, num_layers=4, num_heads=4), 61, 20),
                ('3.3M', dict(d_model=256, num_layers=4, num_heads=4), 31, 10),
                ('16M', dict(d_model=512, num_layers=5, num_heads=8), 11, 5)],
    'quick': [('0.1M', dict(d_model=64, num_layers=2, num_heads=2), 7, 20)],
}


def multisteps_costs(size: str) -> list[dict]:
  """Optimizer-side cost of one call, per model size: the train step's own cycle (interim),
  LazyMultiSteps (optax interface) and optax.MultiSteps.

  Interim: a call that completes no update, chained with donation as in training, against a
  bare float32 add of a gradient-sized tree into a donated accumulator. Emitting (LazyMultiSteps,
  optax.MultiSteps): the call that completes an update against the plain optax AdamW step on
  the mean gradient (update + apply, donated); the train step's own completing program is
  measured by `experiments.bench_emit`. Timed in interleaved rounds: medians of the times, and
  of the per-round ratios.
  """
  return [_lazy_costs(label, dims, rounds, reps) for label, dims, rounds, reps in LAZY_SIZES[size]]


def _chained(fn, state, *args):
  """A call of `fn(state, *args) -> state` (jitted, donating the state), each on the last
  one's result."""
  holder = [state]

  def call():
    holder[0] = fn(holder[0], *args)
    return holder[0]
  return call


def _lazy_costs(label, dims, rounds, reps) -> dict:
  """The programs of `multisteps_costs` at one size. The sums (or the mean gradient) are an
  argument of every program, not a constant baked into it: a constant lets XLA fold the
  division and the skip decision away at compile time."""
  import jax
  import jax.numpy as jnp
  import optax

  import accumjax
  from accumjax import optim
  from accumjax import step as step_lib
  from accumjax.lm import model
  _, params = model.make_lm(model.ModelConfig(max_len=64, **dims))
  rng = jax.random.key(0)
  sums = accumjax.GradSums(
      jax.tree.map(lambda p: jax.random.normal(rng, p.shape, jnp.float32) * 1e-3, params),
      jnp.float32(100.0), jnp.float32(50.0), jnp.float32(0.0))
  inner = optax.adamw(1e-3)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  config = accumjax.AccumConfig(num_microbatches=2, microbatch_size=1, mode='multisteps')
  state = accumjax.init_train_state(params, inner, 0, config)

  # the train step's interim program without the gradient (the sums given): it donates the
  # cycle and adds (the completing program is experiments.bench_emit's)
  own_interim = jax.jit(lambda c, s: step_lib.add_to_cycle(c, s, 1), donate_argnums=0)

  def multisteps(wrapper, k, donate=True):  # an optax user's loop (the whole state donated)
    ms_tx = wrapper(accumjax.normalized(inner), k, use_grad_mean=False)
    fn = jax.jit(lambda st, s: (lambda u, o: (o, optax.apply_updates(st[1], u.grads)))(
        *ms_tx.update(s, st[0], optim.as_opt_params(st[1]))),
        donate_argnums=0 if donate else ())
    return _chained(fn, (ms_tx.init(optim.as_opt_params(params)), copy(params)), sums)

  add = jax.jit(lambda a, g: jax.tree.map(jnp.add, a, g), donate_argnums=0)
  mean_grads = jax.tree.map(lambda g: g / sums.weight, sums.grads)
  plain = jax.jit(lambda st, g: (lambda u, s: (s, optax.apply_updates(st[1], u)))(
      *inner.update(g, st[0], st[1])), donate_argnums=0)
  variants = {
      'bare float32 add': _chained(add, jax.tree.map(jnp.zeros_like, sums.grads), sums.grads),
      'plain optax step': _chained(plain, (inner.init(params), copy(params)), mean_grads),
      'own cycle interim': _chained(own_interim, copy(state.cycle), sums),
      'LazyMultiSteps interim': multisteps(optim.LazyMultiSteps, 10**6),
      'optax.MultiSteps interim': multisteps(optax.MultiSteps, 10**6),
      'LazyMultiSteps emitting': multisteps(optim.LazyMultiSteps, 1),
      'optax.MultiSteps emitting': multisteps(optax.MultiSteps, 1),
      'LazyMultiSteps interim, not donated': multisteps(optim.LazyMultiSteps, 10**6, False),
      'optax.MultiSteps interim, not donated': multisteps(optax.MultiSteps, 10**6, False),
      'LazyMultiSteps emitting, not donated': multisteps(optim.LazyMultiSteps, 1, False),
      'optax.MultiSteps emitting, not donated': multisteps(optax.MultiSteps, 1, False),
  }
  times = _interleaved_times(variants, rounds, reps, warmup=3)
  med = {v: statistics.median(t) for v, t in times.items()}
  return {'size': label, 'num_params': model.num_params(params),
          'leaves': len(jax.tree.leaves(params)), 'ms': {v: t * 1e3 for v, t in med.items()},
          'rounds': rounds, 'reps': reps, 'rounds_ms': {v: [x * 1e3 for x in t]
                                                         for v, t in times.items()}}


def noise_costs(size: str, rounds: int = 9, reps: int = 3, k: int = 8) -> list[dict]:
  """Time per K=8 update with and without noise statistics, for scan and multisteps mode, on
  the same packed batch as the main bench; the four steps timed in interleaved rounds (so load
  on the machine hits them alike), medians of the rounds."""
  import jax
  import optax

  import accumjax
  from accumjax.lm import data, model
  from accumjax.lm.build import make_loss_fn

  s = SIZES[size]
  rows, seq = s['batch'], s['seq_len']
  train_split, _ = data.load_splits(None, seq, pack=True)
  batch = jax.device_put(data.RowIterator(train_split, 0).next_rows(rows))
  apply, params = model.make_lm(model.ModelConfig(
      d_model=s['d_model'], num_layers=s['num_layers'], num_heads=s['num_heads'], max_len=seq))
  loss_fn = make_loss_fn(apply)
  runners = {}
  for mode in ('scan', 'multisteps'):
    for noise in (False, True):
      config = accumjax.AccumConfig(num_microbatches=k, microbatch_size=rows // k, mode=mode,
                                    seq_len=seq, noise_stats=noise)
      tx = accumjax.accumulating_optimizer(optax.adamw(1e-3), config)
      step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config))
      calls = accumjax.loop.split_calls(batch, config)
      holder = [accumjax.init_train_state(params, tx, 0, config)]

      def one_update(step=step, calls=calls, holder=holder, config=config):
        holder[0] = accumjax.run_update(step, holder[0], calls, config).state
        return holder[0]
      runners[(mode, noise)] = one_update
  times = _interleaved_times(runners, rounds, reps, warmup=2)
  results = []
  for mode in ('scan', 'multisteps'):
    off, on = (statistics.median(times[(mode, n)]) for n in (False, True))
    paired = statistics.median(b / a for a, b in zip(times[(mode, False)], times[(mode, True)],
                                                     strict=True))
    results.append({'mode': mode, 'k': k, 'num_params': model.num_params(params),
                    'off_ms': off * 1e3, 'on_ms': on * 1e3, 'ratio': on / off,
                    'paired_ratio': paired, 'rounds': rounds})
  return results


def noise_report(results, seconds, quick) -> str:
  lines = [
      '# The cost of noise statistics (`--noise-stats`, `AccumConfig.noise_stats`)', '',
      f'Command: `python -m experiments.bench --noise{" --quick" if quick else ""}` '
      f'({seconds:.0f} s on {os.cpu_count()} CPU cores, fp32). One optimizer update of K='
      f'{results[0]["k"]} micro-batches ({results[0]["num_params"]:,}-param LM, the packed '
      'real-text batch of the main bench), with and without the statistics (one more squared '
      'norm of each micro-batch gradient, two scalars summed along). The steps are timed in '
      f'{results[0]["rounds"]} interleaved rounds; medians; "paired" is the median of the '
      'per-round ratios. Target: <= 1.03.', '',
      '| mode | without ms/update | with ms/update | with / without | paired ratio |',
      '|---|---|---|---|---|']
  for r in results:
    lines.append(f'| {r["mode"]} | {r["off_ms"]:.1f} | {r["on_ms"]:.1f} | {r["ratio"]:.3f} | '
                 f'{r["paired_ratio"]:.3f} |')
  return '\n'.join(lines) + '\n'


def _fmt_mib(n):
  return f'{n / 2**20:.1f}'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help='tiny model, K in {1, 4}')
  p.add_argument('--lazy', action='store_true',
                 help='only the LazyMultiSteps vs optax.MultiSteps call costs at 0.9M, 3.3M and '
                      '16M params (benchmarks/lazy_multisteps.md; with --quick a tiny model)')
  p.add_argument('--noise', action='store_true',
                 help='only the cost of --noise-stats: the K=8 update with and without it, '
                      'scan and multisteps (benchmarks/noise_overhead.md)')
  p.add_argument('--core', action='store_true',
                 help='only the accumulation core vs a hand-written scan, optax.microbatching '
                      'and the full batch, side by side (benchmarks/core.md; experiments/'
                      'bench_core.py)')
  p.add_argument('--emit', action='store_true',
                 help='only the step that completes an update vs a plain optax AdamW step, side '
                      'by side at 0.9M, 3.3M and 16M params (benchmarks/emit.md; experiments/'
                      'bench_emit.py)')
  p.add_argument('--cell', nargs=2, metavar=('VARIANT', 'K'), help=argparse.SUPPRESS)
  p.add_argument('--out', default=None, help='results markdown (default benchmarks/RESULTS.md)')
  a = p.parse_args(argv)
  size = 'quick' if a.quick else 'default'
  out_of = lambda name: pathlib.Path(a.out) if a.out else ROOT / 'benchmarks' / (
      f'{name}-quick.md' if a.quick else f'{name}.md')
  if a.core or a.emit:
    from experiments import bench_core, bench_emit
    module, name = (bench_core, 'core') if a.core else (bench_emit, 'emit')
    print(module.main(a.quick, out_of(name)))
    return 0
  if a.lazy or a.noise:
    start = time.time()
    text = (lazy_report(multisteps_costs(size), time.time() - start, a.quick) if a.lazy
            else noise_report(noise_costs(size), time.time() - start, a.quick))
    print(text)
    out_of('lazy_multisteps' if a.lazy else 'noise_overhead').write_text(text)
    return 0
  if a.cell:
    print(json.dumps(run_cell(a.cell[0], int(a.cell[1]), size)))
    return 0
  s = SIZES[size]
  cells = [('full', 1)] + [(v, k) for k in s['ks'] for v in VARIANTS[1:]
                           if not (v == 'hybrid' and k < 2)]
  results = []
  start = time.time()
  for variant, k in cells:
    argv = [sys.executable, '-m', 'experiments.bench', '--cell', variant, str(k)]
    argv += ['--quick'] if a.quick else []
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
    if done.returncode:
      sys.stderr.write(done.stderr[-3000:])
      return 1
    r = json.loads(done.stdout.strip().splitlines()[-1])
    results.append(r)
    print(f'{variant:>17} K={k:<3} compiled {_fmt_mib(r["memory"]["total"])} MiB '
          f'(temp {_fmt_mib(r["memory"]["temp"])})  peak RSS {_fmt_mib(r["peak_rss"])} MiB  '
          f'compilations {r["compilations"]}', flush=True)
  times = side_by_side(size, cells, rounds=s['reps'])
  for r in results:
    r['rounds_s'] = times[(r['variant'], r['k'])]
    r['update_s'] = statistics.median(r['rounds_s'])
    r['tokens_per_s'] = r['tokens_per_update'] / r['update_s']
    print(f'{r["variant"]:>17} K={r["k"]:<3} {r["update_s"] * 1e3:9.1f} ms/update', flush=True)
  text = report(results, times, size, time.time() - start, a.quick)
  print(text)
  out = pathlib.Path(a.out) if a.out else ROOT / 'benchmarks' / (
      'RESULTS-quick.md' if a.quick else 'RESULTS.md')
  out.write_text(text)
  plot(results, out.with_suffix('.png'))
  return 0


def lazy_report(results, seconds, quick) -> str:
  lines = [
      '# The optimizer side of one call: the own cycle, LazyMultiSteps, optax.MultiSteps', '',
      f'Command: `python -m experiments.bench --lazy{" --quick" if quick else ""}` '
      f'({seconds / 60:.1f} min, {os.cpu_count()} CPU cores, JAX on CPU, fp32). The main job\'s '
      'transformer at three sizes; the sums of one call are given (no gradient computed), '
      'AdamW. Own cycle interim: the train step\'s interim program without the gradient '
      '(`step.add_to_cycle` with the cycle donated). LazyMultiSteps and optax.MultiSteps: an '
      'optax user\'s loop, `update` + apply with the whole state donated under plain '
      '`jax.jit`. Interim = a call that completes no update (K = 10**6); emitting = K = 1. '
      'Plain optax step: AdamW update + apply on the mean gradient, donated. The sums (the '
      'mean gradient) are an argument of every program, not a constant of it. Every variant '
      'is timed once per round, in turn (rounds x calls per round below); a ratio is the '
      'median over rounds of the two variants\' times in the same round (the target column '
      'also gives the 25th-75th percentiles of those ratios: this host is shared and noisy), '
      'a time the median over rounds. The completing call of the train step\'s own cycle is '
      'in `emit.md` '
      '(`python -m experiments.bench --emit`).', '',
      '| params | leaves | rounds x calls | bare add ms | own cycle interim / add (target <= '
      '1.2) | LazyMultiSteps interim / add | optax.MultiSteps interim / add | plain optax step '
      'ms | LazyMultiSteps emitting / plain step | optax.MultiSteps emitting / plain step |',
      '|---|---|---|---|---|---|---|---|---|---|']
  add, plain = 'bare float32 add', 'plain optax step'
  for r in results:
    ms = r['ms']
    lines.append(
        f'| {r["size"]} ({r["num_params"]:,}) | {r["leaves"]} | {r["rounds"]} x {r["reps"]} | '
        f'{ms[add]:.2f} | {_paired(r, "own cycle interim", add, quartiles=True)} | '
        f'{_paired(r, "LazyMultiSteps interim", add)} | '
        f'{_paired(r, "optax.MultiSteps interim", add)} | {ms[plain]:.2f} | '
        f'{_paired(r, "LazyMultiSteps emitting", plain)} | '
        f'{_paired(r, "optax.MultiSteps emitting", plain)} |')
  lines += ['', 'LazyMultiSteps / optax.MultiSteps as a drop-in in an optax user\'s loop, with '
            'the state donated (`jax.jit(..., donate_argnums=0)`) and under plain `jax.jit` '
            '(not donated: XLA copies what the call passes through, the accumulator and the '
            'optimizer state included):', '',
            '| params | interim, donated | interim, not donated | emitting, donated | '
            'emitting, not donated |', '|---|---|---|---|---|']
  for r in results:
    pair = lambda call, tail, r=r: _paired(r, f'LazyMultiSteps {call}{tail}',
                                           f'optax.MultiSteps {call}{tail}')
    lines.append(f'| {r["size"]} | {pair("interim", "")} | {pair("interim", ", not donated")} '
                 f'| {pair("emitting", "")} | {pair("emitting", ", not donated")} |')
  lines += ['', 'Milliseconds per call:', '',
            '| params | ' + ' | '.join(results[0]['ms']) + ' |',
            '|---|' + '---|' * len(results[0]['ms'])]
  for r in results:
    lines.append(f'| {r["size"]} | ' + ' | '.join(f'{v:.2f}' for v in r['ms'].values()) + ' |')
  return '\n'.join(lines) + '\n'


def _round_ratio(num, den) -> str:
  """Median (25th-75th percentile) over rounds of num[i] / den[i]."""
  ratios = [a / b for a, b in zip(num, den, strict=True)]
  if len(ratios) < 2:
    return f'{ratios[0]:.2f}'
  q1, _, q3 = statistics.quantiles(ratios, n=4)
  return f'{statistics.median(ratios):.2f} ({q1:.2f}-{q3:.2f})'


def report(results, times, size, seconds, quick):
  """RESULTS.md: times from `side_by_side` (one process, interleaved rounds), memory from the
  cells' own processes."""
  s = SIZES[size]
  by = {(r['variant'], r['k']): r for r in results}
  full = by['full', 1]
  acc_bytes = full['num_params'] * 4
  lines = [
      '# accumjax benchmark: the cost of accumulation', '',
      f'Command: `python -m experiments.bench{" --quick" if quick else ""}` '
      f'({seconds / 60:.1f} min, {os.cpu_count()} CPU cores, JAX on CPU, fp32). Model: the '
      f'main job\'s transformer, d_model {s["d_model"]}, {s["num_layers"]} layers, '
      f'{full["num_params"]:,} params; effective batch {s["batch"]} x {s["seq_len"]} tokens '
      '(packed real text) per update, AdamW. Times: every cell (and the parts of a scan '
      'update: one micro-batch\'s gradient, the optimizer step) built in one process and '
      f'timed in {s["reps"]} interleaved rounds, each once per round in turn, after a '
      'warm-up; a time is the median over rounds, a ratio the median over rounds of the '
      'two times in the same round (25th-75th percentiles in brackets). Memory: each cell '
      'compiled and run in its own process (peak RSS is per process).', '',
      '| variant | K | ms / update | tokens/s | compiled total MiB | compiled temp MiB | '
      'peak RSS MiB | compilations |', '|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(
        f'| {r["variant"]} | {r["k"]} | {r["update_s"] * 1e3:.1f} | {r["tokens_per_s"]:.0f} | '
        f'{_fmt_mib(r["memory"]["total"])} | {_fmt_mib(r["memory"]["temp"])} | '
        f'{_fmt_mib(r["peak_rss"])} | {r["compilations"]} |')
  lines += ['', '## Ratios vs targets', '',
            '| K | scan / (K x micro-batch grad + optimizer step) (target <= 1.05) | '
            'scan / full batch (target <= 1.0) | interim optimizer cost / bare add: lazy '
            '(target <= 1.2) | same, optax.MultiSteps | scan temp / (full temp / K + '
            'accumulator) (target <= 1.2) | predicted / measured memory |',
            '|---|---|---|---|---|---|---|']
  for k in s['ks']:
    scan = by['scan', k]
    parts = [k * g + o for g, o in zip(times[('microbatch grad', k)],
                                        times[('optimizer step', 1)], strict=True)]
    lazy, ms = by.get(('multisteps_lazy', k)), by.get(('multisteps_optax', k))
    opt_ratio = lambda r: (f'{r["interim_ratio"]:.2f}'
                           if r and 'bare_add_s' in r else 'n/a (K=1)')
    temp_ratio = scan['memory']['temp'] / (full['memory']['temp'] / k + acc_bytes)
    measured = scan['peak_rss'] - scan['rss_before']
    lines.append(
        f'| {k} | {_round_ratio(times[("scan", k)], parts)} | '
        f'{_round_ratio(times[("scan", k)], times[("full", 1)])} | '
        f'{opt_ratio(lazy)} | {opt_ratio(ms)} | {temp_ratio:.2f} | '
        f'{scan["memory"]["total"] / max(measured, 1):.2f} |')
  lines += ['', 'Predicted memory is XLA\'s compiled total for the scan step (what the planner '
            'of `--memory-budget` uses); measured is the process\'s peak RSS growth from just '
            'before compiling to the end of its updates (it includes the compiler\'s own '
            'memory and the allocator\'s slack, so a ratio below 1 is expected on CPU).', '',
            'No recompilation after the first update: compilations counts the programs of the '
            'step (1 for full/scan/optax_microbatch; 2 for multisteps/hybrid, the interim and '
            'the last-call program), measured in each cell\'s own process after a warm-up and '
            'two updates; states are donated.',
            '']
  return '\n'.join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for variant in VARIANTS[1:]:
    rs = [r for r in results if r['variant'] == variant]
    if not rs:
      continue
    ks = [r['k'] for r in rs]
    axes[0].plot(ks, [r['update_s'] * 1e3 for r in rs], 'o-', label=variant)
    axes[1].plot(ks, [r['memory']['temp'] / 2**20 for r in rs], 'o-', label=variant)
  full = next(r for r in results if r['variant'] == 'full')
  axes[0].axhline(full['update_s'] * 1e3, color='k', ls='--', label='full batch')
  axes[1].axhline(full['memory']['temp'] / 2**20, color='k', ls='--', label='full batch')
  for ax, label in ((axes[0], 'ms per optimizer update'), (axes[1], 'compiled temp MiB')):
    ax.set_xscale('log', base=2)
    ax.set_xlabel('K (micro-batches per update)')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[1].set_yscale('log')
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  sys.exit(main())
