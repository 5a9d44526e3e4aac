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
  (`experiments.naive_dp.plain_jit_step`): XLA puts an all-reduce inside the scan loop body;
- `fsdp=F call` / `fsdp=F microbatch` (F = 2: mesh data=2,fsdp=2; F = 4: data=1,fsdp=4):
  params, optimizer state and accumulator sharded over F devices, params all-gathered once per
  call, gradients reduce-scattered once per call or after every micro-batch (scan mode).
Also timed alone: the params all-gather of one call at F = 2 and 4 (what FSDP adds per call
for the forward pass). And a second table, benchmarks/fsdp_memory.md: per device, the state
and accumulator bytes and XLA's memory analysis of the compiled step at data=4 and fsdp=2, 4,
both policies, in scan and multisteps mode (where the accumulator lives in the state).
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
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

import accumjax  # noqa: E402
from accumjax import parallel  # noqa: E402
from accumjax import state as state_lib  # noqa: E402
from accumjax.lm import data, model  # noqa: E402
from accumjax.lm.build import make_loss_fn  # noqa: E402
from experiments import hlo  # noqa: E402
from experiments.naive_dp import plain_jit_step  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = {
    'default': dict(d_model=128, num_layers=4, num_heads=4, seq_len=128, microbatch=2,
                    ks=(4, 8, 16), rounds=5),
    'quick': dict(d_model=32, num_layers=1, num_heads=2, seq_len=32, microbatch=2, ks=(4,),
                  rounds=3),
}
VARIANTS = ('scan psum', 'scan ordered', 'hybrid psum', 'multisteps psum', 'plain jit',
            'fsdp=2 call', 'fsdp=2 microbatch', 'fsdp=4 call', 'fsdp=4 microbatch')


def _mesh_of(variant):
  """(data, fsdp) of a variant on 4 devices."""
  if variant.startswith('fsdp='):
    f = int(variant.split()[0].split('=')[1])
    return 4 // f, f
  return 4, 1


def build(variant, k, s, params, loss_fn, batch):
  """(one_update() -> state, collective counts of one call, calls per update)."""
  mode = variant.split()[0] if variant.split()[0] in accumjax.config.MODES else 'scan'
  mesh = parallel.make_mesh(*_mesh_of(variant))
  config = accumjax.AccumConfig(
      num_microbatches=k, microbatch_size=s['microbatch'], mode=mode,
      microbatches_per_call=k // 2 if mode == 'hybrid' else None, num_devices=mesh.size,
      dp_reduction='ordered' if variant.endswith('ordered') else 'psum',
      fsdp_reduce='microbatch' if variant.endswith('microbatch') else 'call')
  tx = accumjax.accumulating_optimizer(optax.adamw(1e-3), config)
  state = parallel.place_state(accumjax.init_train_state(params, tx, 0), mesh)
  calls = [parallel.shard_batch(c, mesh) for c in accumjax.loop.split_calls(batch, config)]
  if variant == 'plain jit':
    step = plain_jit_step(loss_fn, tx, config, mesh)
  else:
    step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config, mesh=mesh))
  lowered = step.lower(state, calls[0], last_call=len(calls) == 1)
  counts = hlo.collective_counts(lowered.compile().as_text())
  holder = [state]

  def one_update():
    holder[0] = accumjax.run_update(step, holder[0], calls, config).state
    return holder[0]

  return one_update, counts, len(calls)


def gather_alone(params, f):
  """The params all-gather of one FSDP call, jitted alone (its result summed per leaf, so that
  only scalars leave the program)."""
  mesh = parallel.make_mesh(4 // f, f)
  specs = parallel.tree_specs(params, f)
  sharded = parallel.place_state(params, mesh)
  fn = jax.jit(jax.shard_map(
      lambda p: jax.tree.map(jnp.sum, parallel.gather_fsdp(p, specs, f)), mesh=mesh,
      in_specs=(specs,), out_specs=PartitionSpec(), check_vma=False))
  return lambda: fn(sharded)


def memory_rows(params, loss_fn, s, k) -> list[dict]:
  """Per-device state bytes and XLA's memory analysis of the compiled step (last call)."""
  rows = []
  batch_rows = 4 * s['microbatch'] * k
  for mode in ('scan', 'multisteps'):
    for d, f, policy in ((4, 1, 'call'), (2, 2, 'call'), (2, 2, 'microbatch'),
                         (1, 4, 'call'), (1, 4, 'microbatch')):
      mesh = parallel.make_mesh(d, f)
      config = accumjax.AccumConfig(num_microbatches=k, microbatch_size=s['microbatch'],
                                    mode=mode, num_devices=4, fsdp_reduce=policy)
      tx = accumjax.accumulating_optimizer(optax.adamw(1e-3), config)
      state = parallel.abstract_state(
          jax.eval_shape(lambda p, tx=tx: accumjax.init_train_state(p, tx, 0), params), mesh)
      rows_per_call = batch_rows // config.calls_per_update
      batch = {name: jax.ShapeDtypeStruct((rows_per_call, s['seq_len']), dtype,
                                          sharding=parallel.batch_sharding(mesh))
               for name, dtype in (('inputs', jnp.int32), ('targets', jnp.int32),
                                   ('mask', jnp.float32))}
      step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config, mesh=mesh))
      memory = accumjax.planner.compiled_memory(step, state, batch, last_call=True)
      batch_bytes = sum(x.sharding.shard_shape(x.shape)[0] * s['seq_len'] * 4
                        for x in batch.values())
      parts = state_lib.state_bytes_per_device(state, config)
      rows.append({'mode': mode, 'mesh': f'data={d},fsdp={f}', 'fsdp': f, 'policy': policy,
                   **parts, 'state_and_accumulators': sum(parts.values()),
                   'xla_state_arguments': memory['argument'] - batch_bytes,
                   'xla_temp': memory['temp'], 'xla_total': memory['total']})
  for r in rows:
    base = next(b for b in rows if b['mode'] == r['mode'] and b['fsdp'] == 1)
    r['ratio'] = r['state_and_accumulators'] / base['state_and_accumulators']
    r['xla_ratio'] = r['xla_state_arguments'] / base['xla_state_arguments']
    r['total_ratio'] = r['xla_total'] / base['xla_total']
  return rows


def measure(size: str) -> list[dict]:
  s = SIZES[size]
  mesh = parallel.make_mesh(4)
  train_split, _ = data.load_splits(None, s['seq_len'], pack=True)
  apply, params = model.make_lm(model.ModelConfig(
      d_model=s['d_model'], num_layers=s['num_layers'], num_heads=s['num_heads'],
      max_len=s['seq_len']))
  loss_fn = make_loss_fn(apply)
  results = []
  for k in s['ks']:
    batch = data.RowIterator(train_split, 0).next_rows(mesh.size * s['microbatch'] * k)
    runs = {v: build(v, k, s, params, loss_fn, batch) for v in VARIANTS}
    runs.update({f'params all-gather alone, fsdp={f}': (gather_alone(params, f), {}, 1)
                 for f in (2, 4)})
    for fn, _, _ in runs.values():  # warm-up: compile and run once
      jax.block_until_ready(fn())
    times = {v: [] for v in runs}
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
              if op in ('all-reduce', 'all-gather', 'reduce-scatter')) * calls,
          'tokens_per_update': mesh.size * s['microbatch'] * k * s['seq_len'],
          'num_params': model.num_params(params)})
  return results, memory_rows(params, loss_fn, s, s['ks'][0])


def _header(size, seconds, first):
  return (
      f'Command: `python -m experiments.bench_dp{" --quick" if size == "quick" else ""}` '
      f'({seconds / 60:.1f} min; writes data_parallel{"-quick" if size == "quick" else ""}.md '
      f'and fsdp_memory{"-quick" if size == "quick" else ""}.md). Device: '
      f'{jax.devices()[0].platform.upper()}, {jax.device_count()} devices forced with XLA_FLAGS '
      f'on a {os.cpu_count()}-core machine (the devices share the cores, so this measures the '
      f'reduction pattern\'s overhead, not real scaling). {first["num_params"]:,}-param LM, '
      f'fp32, AdamW, micro-batch {SIZES[size]["microbatch"]} rows per device.')


def report(results, size, seconds) -> str:
  first = results[0]
  timed = [r for r in results if not r['variant'].startswith('params all-gather')]
  gathers = [r for r in results if r['variant'].startswith('params all-gather')]
  lines = [
      '# Data parallel and FSDP: reductions per update (4 CPU devices)', '',
      _header(size, seconds, first) + ' Ratio = time / `scan psum` time in the '
      'same interleaved rounds. Collectives: counted in the compiled HLO of one call; `in '
      'loop` = inside the micro-batch scan\'s while body, which runs once per micro-batch '
      '(`plain jit`\'s all-to-alls only move the int token rows). Collectives per update = '
      'all-reduces, all-gathers and reduce-scatters executed per update (for FSDP: the params '
      'all-gather, the gradient reduce-scatter(s), the all-reduce of the scalars and, at '
      'data=2, of the shards over `data`, and the grad-norm\'s all-reduce of the sharded '
      'gradient).', '',
      '| K | tokens/update | variant | calls/update | collectives in one call (HLO) '
      '| collectives/update | time/update (s) | ratio |',
      '|---|---|---|---|---|---|---|---|']
  for r in timed:
    lines.append(f'| {r["k"]} | {r["tokens_per_update"]:,} | {r["variant"]} | {r["calls"]} | '
                 f'{r["collectives"]} | {r["reductions_per_update"]} | {r["time_s"]:.3f} | '
                 f'{r["ratio"]:.2f} |')
  lines += [
      '', '## The params all-gather alone', '',
      'FSDP gathers the params once per call, before the micro-batch scan (the full params '
      'live for the call). Timed alone, in the same rounds, as a share of a `scan psum` '
      'update of that K:', '',
      '| K | gather | time (ms) | share of a scan psum update |', '|---|---|---|---|']
  for r in gathers:
    lines.append(f'| {r["k"]} | {r["variant"].split(", ")[1]} | {r["time_s"] * 1e3:.2f} | '
                 f'{r["ratio"]:.3f} |')
  return '\n'.join(lines) + '\n'


def memory_report(rows, size, seconds, first) -> str:
  mib = lambda n: f'{n / 2**20:.3f}'
  lines = [
      '# FSDP: state and accumulator bytes per device (4 CPU devices)', '',
      _header(size, seconds, first) + f' K={SIZES[size]["ks"][0]}.', '',
      'Per device, from the shardings of the state (`accumjax.state.state_bytes_per_device`): '
      'params, '
      'optimizer state (AdamW mu and nu), the accumulator kept in the state between calls '
      '(multisteps/hybrid) and the accumulator carried through a call\'s scan (full size under '
      '`call`, a shard under `microbatch`). `ratio` = their sum / the data=4 sum (ideal 1/F). '
      'XLA columns: `jit(step).lower(...).compile().memory_analysis()` of the last call of an '
      'update, per device: the state\'s argument bytes (arguments minus the batch), temp bytes '
      '(activations, the scan carry, the gathered params) and the total '
      '(temp + arguments + outputs - donated).', '',
      '| mode | mesh | policy | params | opt state | acc. between calls | acc. in a call | '
      'sum | ratio | XLA state args | XLA args ratio | XLA temp | XLA total | total ratio |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["mode"]} | {r["mesh"]} | {r["policy"] if r["fsdp"] > 1 else "-"} | '
        f'{mib(r["params"])} | {mib(r["opt_state"])} | {mib(r["accumulator"])} | '
        f'{mib(r["call_accumulator"])} | {mib(r["state_and_accumulators"])} | '
        f'{r["ratio"]:.3f} | {mib(r["xla_state_arguments"])} | {r["xla_ratio"]:.3f} | '
        f'{mib(r["xla_temp"])} | {mib(r["xla_total"])} | {r["total_ratio"]:.3f} |')
  lines += ['', 'Bytes in MiB.']
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help='tiny model, one K (smoke test)')
  p.add_argument('--out', default=None, help='directory of the tables (default benchmarks/: '
                 'data_parallel.md and fsdp_memory.md, or *-quick.md with --quick)')
  a = p.parse_args(argv)
  if jax.device_count() < 4:
    sys.stderr.write(f'error: needs 4 devices, found {jax.device_count()}; run with '
                     'XLA_FLAGS=--xla_force_host_platform_device_count=4\n')
    return 2
  size = 'quick' if a.quick else 'default'
  t0 = time.perf_counter()
  results, memory = measure(size)
  seconds = time.perf_counter() - t0
  suffix = '-quick' if a.quick else ''
  out = pathlib.Path(a.out or ROOT / 'benchmarks')
  out.mkdir(parents=True, exist_ok=True)
  for name, text in ((f'data_parallel{suffix}.md', report(results, size, seconds)),
                     (f'fsdp_memory{suffix}.md',
                      memory_report(memory, size, seconds, results[0]))):
    (out / name).write_text(text)
    print(text)
    print(f'written to {out / name}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
