"""Remat and accumulation, the two levers: memory per micro-batch row and time per update per
remat policy, and the planner's choice of (remat, micro-batch, K) for a budget.

    python -m experiments.remat_bench            # ~6 minutes on 2 CPU cores
    python -m experiments.remat_bench --quick    # the measured part only, a smaller model

1. Measured on this CPU, one device, float32 (bf16 is slow here), a d128 x 4-layer LM at seq
   128: per remat policy, memory per micro-batch row (XLA's compiled step at micro-batch 4 and
   8, the slope) and time per update at micro-batch 8, K = 4 (interleaved rounds, median;
   ratios to `none` from the same rounds).
2. Compile-only on 8 fake CPU devices (fsdp=8, the 'layer' gather, bfloat16, seq 1024, 524,288
   tokens per update): per policy the planner's linear fit (fixed bytes + bytes per row, from
   its two compiles), and its choice for a 16 GiB and an 80 GB budget per device at 85M and
   1.2B, with what it weighed and its planning time (the compiles are shared by the two
   budgets here, so the time is that of the first).
Writes benchmarks/remat.md with the command.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import argparse  # noqa: E402 (XLA_FLAGS must be set before jax starts)
import dataclasses  # noqa: E402
import functools  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import accumjax  # noqa: E402
from accumjax import layers, planner  # noqa: E402
from accumjax.lm import build, model  # noqa: E402
from accumjax.lm import config as config_lib  # noqa: E402
from experiments.timing import interleaved_times  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = {'default': dict(d_model=128, num_layers=4, num_heads=4, seq=128, rounds=5),
         'quick': dict(d_model=64, num_layers=2, num_heads=2, seq=64, rounds=3)}
BUDGETS = {'16 GiB': '16GiB', '80 GB': '80GB'}


def _small_step(dims, remat, b, k):
  cfg = model.ModelConfig(d_model=dims['d_model'], num_layers=dims['num_layers'],
                          num_heads=dims['num_heads'], max_len=dims['seq'], remat=remat)
  apply, params = model.make_lm(cfg, seed=0)
  config = accumjax.AccumConfig(num_microbatches=k, microbatch_size=b, seq_len=dims['seq'])
  tx = accumjax.accumulating_optimizer(optax.adamw(1e-3), config)
  state = accumjax.init_train_state(params, tx, 0, config)
  step = accumjax.jit_train_step(accumjax.make_train_step(build.make_loss_fn(apply), tx, config),
                                 donate=False)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, size=(b * k, dims['seq'] + 1)), jnp.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'mask': jnp.ones((b * k, dims['seq']), jnp.float32)}
  return step, state, batch


def measured(dims) -> list[dict]:
  rows, fns = [], {}
  for remat in layers.REMATS:
    sizes = []
    for b in (4, 8):
      step, state, batch = _small_step(dims, remat, b, 4)
      sizes.append(planner.compiled_memory(step, state, batch, last_call=True)['total'])
    step, state, batch = _small_step(dims, remat, 8, 4)
    fns[remat] = functools.partial(lambda s, st, bt: s(st, bt, last_call=True)[1]['loss'],
                                   step, state, batch)
    rows.append({'remat': remat, 'per_row': (sizes[1] - sizes[0]) / 4, 'at_8': sizes[1]})
  times = interleaved_times(fns, dims['rounds'], 2, 1)
  for r in rows:
    r['ms'] = 1e3 * statistics.median(times[r['remat']])
    r['vs_none'] = statistics.median(
        [a / b for a, b in zip(times[r['remat']], times['none'], strict=True)])
  return rows


def planned(size: str) -> dict:
  values = config_lib.PRESETS[size]
  cfg = config_lib.replace(config_lib.TrainConfig(), mesh='fsdp=8', fsdp_gather='layer', **values)
  mesh = build.make_mesh(cfg.mesh)
  models = {r: model.make_lm(dataclasses.replace(cfg.model, remat=r), abstract=True)
            for r in layers.REMATS}
  params = models['none'][1]

  @functools.cache
  def step_memory(b, k, remat):
    return build._step_bytes(config_lib.replace(cfg, remat=remat),
                             build.make_loss_fn(models[remat][0]), params, b, k, mesh)

  seconds_of = build._time_model(cfg, params, planner.measure_rates(jnp.bfloat16))
  rows = cfg.tokens_per_update // (cfg.accum.seq_len * mesh.size)
  return {name: planner.plan_trade(step_memory, planner.parse_bytes(budget), seconds_of,
                                   layers.REMATS, rows=rows)
          for name, budget in BUDGETS.items()}


def report(small, dims, plans) -> list[str]:
  fmt = planner.format_bytes
  lines = [f'## Measured here: d{dims["d_model"]} x {dims["num_layers"]} layers, seq '
           f'{dims["seq"]}, float32, one CPU device, K = 4', '',
           '| remat | memory per row | compiled step at micro-batch 8 | ms per update (b=8, K=4) '
           '| vs none (same rounds) |', '|---|---|---|---|---|']
  lines += [f'| {r["remat"]} | {fmt(r["per_row"])} | {fmt(r["at_8"])} | {r["ms"]:.1f} | '
            f'{r["vs_none"]:.2f} |' for r in small]
  for size, by_budget in plans.items():
    fits = next(iter(by_budget.values())).fits
    lines += ['', f'## {size}: compile-only, fsdp=8, layer gather, bf16, seq 1024, 524,288 '
              'tokens per update', '', '| remat | fixed per device | per micro-batch row |',
              '|---|---|---|']
    lines += [f'| {r} | {fmt(f[0])} | {fmt(f[1])} |' for r, f in fits.items()]
    lines += ['', '| budget | choice | planning |', '|---|---|---|']
    lines += [f'| {name} | {planner.describe_plan(p)} | {p.compiles} compiles, {p.seconds:.0f} s |'
              for name, p in by_budget.items()]
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--quick', action='store_true', help='the measured part only, smaller')
  p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'remat.md'))
  a = p.parse_args(argv)
  if not a.quick and jax.device_count() < 8:
    sys.exit('experiments.remat_bench needs 8 devices '
             '(XLA_FLAGS=--xla_force_host_platform_device_count=8).')
  dims = SMALL['quick' if a.quick else 'default']
  small = measured(dims)
  plans = {} if a.quick else {size: planned(size) for size in ('85m', '1.2b')}
  command = 'python -m experiments.remat_bench' + (' --quick' if a.quick else '')
  text = '\n'.join(['# Remat and the planner', '', f'`{command}` (see the module docstring).',
                    '', *report(small, dims, plans), ''])
  pathlib.Path(a.out).write_text(text)
  print(text)
  return small, plans


if __name__ == '__main__':
  main()
