"""Data parallel on 4 devices: one reduction per update vs a reduction per micro-batch.

    python -m experiments.bench_dp            # ~3 minutes on 2 CPU cores (4 fake CPU devices)
    python -m experiments.bench_dp --quick    # ~1 minute, a tiny model

Same global batch per update for every variant (4 devices x micro-batch x K rows of packed
real text, the main job's 0.86M-param LM, fp32, AdamW):
- `scan psum`: accumjax's data-parallel scan step (shard_map; each device scans its own
  micro-batches; one psum of the sums per update);
- `scan ordered`: the same with `dp_reduction='ordered'` (one all-gather, sum in device order);
- `hybrid psum`: c = K/2 micro-batches per call, one psum per call (2 per update);
- `multisteps psum`: one micro-batch per call, so one psum per micro-batch;
- `plain jit`: the one-device step under a plain jit with sharded micro-batches
  (`experiments.naive_dp.plain_jit_step`): XLA puts an all-reduce inside the scan loop body.
Variants are timed in interleaved rounds (these machines are shared and noisy), median per
update; ratios are against `scan psum` measured in the same rounds. Collective counts come from
the compiled HLO of each step. Writes benchmarks/data_parallel.md with the command.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

import argparse  # noqa: E402 (XLA_FLAGS must be set before jax starts)
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

import accumjax  # noqa: E402
from accumjax import parallel  # noqa: E402
from accumjax.lm import data, model  # noqa: E402
from accumjax.lm.build import make_loss_fn  # noqa: E402
from experiments.naive_dp import plain_jit_step  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = {
    'default': dict(d_model=128, num_layers=4, num_heads=4, seq_len=128, microbatch=2,
                    ks=(4, 8, 16), rounds=5),
    'quick': dict(d_model=32, num_layers=1, num_heads=2, seq_len=32, microbatch=2, ks=(4,),
                  rounds=3),
}
VARIANTS = ('scan psum', 'scan ordered', 'hybrid psum', 'multisteps psum', 'plain jit')


def build(variant, k, s, mesh, params, loss_fn, batch):
  """(one_update() -> state, collective counts of one call, calls per update)."""
  mode = variant.split()[0] if variant != 'plain jit' else 'scan'
  config = accumjax.AccumConfig(
      num_microbatches=k, microbatch_size=s['microbatch'], mode=mode,
      microbatches_per_call=k // 2 if mode == 'hybrid' else None, num_devices=mesh.size,
      dp_reduction='ordered' if variant.endswith('ordered') else 'psum')
  tx = accumjax.accumulating_optimizer(optax.adamw(1e-3), config)
  state = parallel.replicate(accumjax.init_train_state(params, tx, 0), mesh)
  calls = [parallel.shard_batch(c, mesh) for c in accumjax.loop.split_calls(batch, config)]
  if variant == 'plain jit':
    step = plain_jit_step(loss_fn, tx, config, mesh)
  else:
    step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config, mesh=mesh))
  lowered = step.lower(state, calls[0], last_call=len(calls) == 1)
  counts = parallel.collective_counts(lowered.compile().as_text())
  holder = [state]

  def one_update():
    holder[0] = accumjax.run_update(step, holder[0], calls, config).state
    return holder[0]

  return one_update, counts, len(calls)


def measure(size: str) -> list[dict]:
  s = SIZES[size]
  mesh = parallel.make_mesh()
  train_split, _ = data.load_splits(None, s['seq_len'], pack=True)
  apply, params = model.make_lm(model.ModelConfig(
      d_model=s['d_model'], num_layers=s['num_layers'], num_heads=s['num_heads'],
      max_len=s['seq_len']))
  loss_fn = make_loss_fn(apply)
  results = []
  for k in s['ks']:
    batch = data.RowIterator(train_split, 0).next_rows(mesh.size * s['microbatch'] * k)
    runs = {v: build(v, k, s, mesh, params, loss_fn, batch) for v in VARIANTS}
    for fn, _, _ in runs.values():  # warm-up: compile and run once
      jax.block_until_ready(fn())
    times = {v: [] for v in VARIANTS}
    for _ in range(s['rounds']):
      for v, (fn, _, _) in runs.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times[v].append(time.perf_counter() - t0)
    base = statistics.median(times['scan psum'])
    for v, (_, counts, calls) in runs.items():
      t = statistics.median(times[v])
      results.append({
          'k': k, 'variant': v, 'time_s': t, 'ratio': t / base, 'calls': calls,
          'collectives': '; '.join(
              f'{op}: {n["in_loop"]} in loop, {n["outside"]} outside' for op, n in counts.items()),
          'reductions_per_update': sum(
              n['in_loop'] * k // calls + n['outside'] for op, n in counts.items()
              if op in ('all-reduce', 'all-gather')) * calls,
          'tokens_per_update': mesh.size * s['microbatch'] * k * s['seq_len'],
          'num_params': model.num_params(params)})
  return results


def report(results, size, seconds) -> str:
  first = results[0]
  lines = [
      '# Data parallel: reductions per update (4 CPU devices)', '',
      f'Command: `python -m experiments.bench_dp{" --quick" if size == "quick" else ""}` '
      f'({seconds / 60:.1f} min). Device: {jax.devices()[0].platform.upper()}, '
      f'{jax.device_count()} devices forced with XLA_FLAGS on a {os.cpu_count()}-core machine '
      f'(the devices share the cores, so this measures the reduction pattern\'s overhead, not '
      f'real scaling). {first["num_params"]:,}-param LM, fp32, AdamW, micro-batch '
      f'{SIZES[size]["microbatch"]} rows per device; ratio = time / `scan psum` time in the '
      'same interleaved rounds. Collectives: counted in the compiled HLO of one call; `in '
      'loop` = inside the micro-batch scan\'s while body, which runs once per micro-batch '
      '(`plain jit`\'s all-to-alls only move the int token rows). Gradient reductions per '
      'update = all-reduces/all-gathers executed per update.', '',
      '| K | tokens/update | variant | calls/update | collectives in one call (HLO) '
      '| gradient reductions/update | time/update (s) | ratio |',
      '|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(f'| {r["k"]} | {r["tokens_per_update"]:,} | {r["variant"]} | {r["calls"]} | '
                 f'{r["collectives"]} | {r["reductions_per_update"]} | {r["time_s"]:.3f} | '
                 f'{r["ratio"]:.2f} |')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help='tiny model, one K (smoke test)')
  p.add_argument('--out', default=None, help='table path (default benchmarks/data_parallel'
                 '.md, or data_parallel-quick.md with --quick)')
  a = p.parse_args(argv)
  if jax.device_count() < 2:
    sys.stderr.write(f'error: needs several devices, found {jax.device_count()}; run with '
                     'XLA_FLAGS=--xla_force_host_platform_device_count=4\n')
    return 2
  size = 'quick' if a.quick else 'default'
  t0 = time.perf_counter()
  results = measure(size)
  text = report(results, size, time.perf_counter() - t0)
  out = pathlib.Path(a.out or ROOT / 'benchmarks' / (
      'data_parallel-quick.md' if a.quick else 'data_parallel.md'))
  out.write_text(text)
  print(text)
  print(f'written to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
