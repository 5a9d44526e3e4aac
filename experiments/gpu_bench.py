"""The benchmark to run the day a GPU is lent: time per update, tokens/s, MFU and peak device
memory of the LM presets across K and remat policy, and the planner's prediction beside it.

    python -m experiments.gpu_bench --preset 85m              # on a GPU (all its devices)
    python -m experiments.gpu_bench --preset 1.2b --ks 8 --remats full
    python -m experiments.gpu_bench --tiny --out /tmp/b.md    # a tiny model, on CPU too

Each row trains `--updates` scan-mode updates (after one for compilation) of the preset's model
on random tokens at the preset's micro-batch per device, K micro-batches, on every device of
the machine (mesh data=1,fsdp=N with the 'layer' gather when N > 1), bfloat16 compute, AdamW.
Time per update is the median over updates (`block_until_ready` per update). MFU = 6 N' x
tokens/s / (devices x peak), N' the non-embedding params plus attention's 2 L d T per token
(remat's recompute is not useful work and is not counted). The peak is stated per device kind
(bf16 dense tensor-core peak from the vendor's datasheet), or `--peak-flops`; on CPU it is the
measured matmul rate (`planner.measure_rates`), said so in the table. Peak device memory comes
from `device.memory_stats()['peak_bytes_in_use']` (None on CPU, which keeps no such count),
beside XLA's compiled memory of the step and accumjax's live-set estimate.
Writes --out (default benchmarks/gpu_bench.md) with the command.
"""

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import accumjax
from accumjax import layers, parallel, planner
from accumjax.lm import config as config_lib
from accumjax.lm import model
from accumjax.lm.build import make_loss_fn

ROOT = pathlib.Path(__file__).resolve().parent.parent
# bf16 dense peak per device, FLOP/s (vendor datasheets: H100/H200 SXM 989.4 TFLOP/s, A100
# 312 TFLOP/s, L4 121 TFLOP/s).
PEAKS = {'H100': 989.4e12, 'H200': 989.4e12, 'A100': 312e12, 'L4': 121e12}
TINY = dict(d_model=32, num_layers=2, num_heads=2, max_len=32, seq_len=32, batch_size=2)


def _peak(device, stated):
  if stated is not None:
    return stated, 'stated (--peak-flops)'
  for name, flops in PEAKS.items():
    if name in device.device_kind:
      return flops, f'{name} bf16 dense datasheet'
  rate = planner.measure_rates(jnp.bfloat16)['flops_per_second']
  return rate, 'measured bf16 matmul rate of this device'


def _settings(preset: str | None, tiny: bool) -> dict:
  values = dict(config_lib.PRESETS[preset or '85m'])
  if tiny:
    values.update(TINY)
  return values


def bench_one(values: dict, k: int, remat: str, updates: int) -> dict:
  devices = jax.device_count()
  mcfg = model.ModelConfig(d_model=values['d_model'], num_layers=values['num_layers'],
                           num_heads=values['num_heads'], max_len=values['max_len'], remat=remat)
  seq, b = values['seq_len'], values.get('batch_size', 8)
  apply, params = model.make_lm(mcfg, seed=0)
  mesh = parallel.make_mesh(1, devices)
  config = accumjax.AccumConfig(num_microbatches=k, microbatch_size=b, compute_dtype='bfloat16',
                                seq_len=seq, num_devices=devices, fsdp_gather='layer')
  tx = accumjax.accumulating_optimizer(optax.adamw(1e-4, b2=0.95, weight_decay=0.1), config)
  loss_fn = make_loss_fn(apply)
  state = parallel.place_state(accumjax.init_train_state(params, tx, 0, config), mesh)
  step = accumjax.jit_train_step(accumjax.make_train_step(
      loss_fn, tx, config, mesh=mesh if devices > 1 else None))
  rows = k * b * devices
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, mcfg.vocab_size, size=(rows, seq + 1))
  batch = parallel.shard_batch({'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
                                'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
                                'mask': jnp.ones((rows, seq), jnp.float32)}, mesh)
  compiled_total = planner.compiled_memory(step, state, batch, last_call=True)['total']
  live = model.live_set(mcfg, state, config, parallel.fsdp_size(mesh))
  times = []
  for i in range(updates + 1):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, last_call=True)
    jax.block_until_ready(metrics['loss'])
    if i:  # the first includes compilation
      times.append(time.perf_counter() - t0)
  stats = jax.devices()[0].memory_stats() or {}
  seconds = statistics.median(times)
  return {'k': k, 'remat': remat, 'b': b, 'seq': seq, 'devices': devices,
          'seconds': seconds, 'tokens_per_s': rows * seq / seconds,
          'flops_per_token': model.flops_per_token(mcfg, params, seq),
          'peak_bytes': stats.get('peak_bytes_in_use'), 'compiled_bytes': compiled_total,
          'estimate_bytes': live['total'], 'loss': float(metrics['loss'])}


def table(rows, peak, peak_words) -> list[str]:
  gb = lambda n: '-' if n is None else planner.format_bytes(n)
  lines = [f'Peak per device: {peak / 1e12:.3g} TFLOP/s ({peak_words}).', '',
           '| remat | K | micro-batch x seq | devices | s / update | tokens/s | MFU | peak memory '
           '(memory_stats) | XLA compiled | estimate | loss |', '|' + '---|' * 11]
  for r in rows:
    mfu = r['flops_per_token'] * r['tokens_per_s'] / (r['devices'] * peak)
    lines.append(
        f'| {r["remat"]} | {r["k"]} | {r["b"]} x {r["seq"]} | {r["devices"]} | '
        f'{r["seconds"]:.3f} | {r["tokens_per_s"]:,.0f} | {mfu:.1%} | {gb(r["peak_bytes"])} | '
        f'{gb(r["compiled_bytes"])} | {gb(r["estimate_bytes"])} | {r["loss"]:.3f} |')
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--preset', choices=list(config_lib.PRESETS), default='85m')
  p.add_argument('--tiny', action='store_true', help='a 2-layer d32 model (runs on CPU)')
  p.add_argument('--ks', default='1,4,8', help='comma-separated K values')
  p.add_argument('--remats', default=','.join(layers.REMATS))
  p.add_argument('--updates', type=int, default=3, help='timed updates per row')
  p.add_argument('--peak-flops', type=float, default=None)
  p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'gpu_bench.md'))
  a = p.parse_args(argv)
  try:
    ks = [int(k) for k in a.ks.split(',')]
    remats = [layers.check_remat(r) for r in a.remats.split(',')]
  except (ValueError, accumjax.ConfigError) as e:
    sys.exit(f'error: --ks {a.ks!r} / --remats {a.remats!r}: {e}')
  if any(k < 1 for k in ks) or a.updates < 1:
    sys.exit(f'error: --ks {a.ks!r} and --updates {a.updates} must be >= 1')
  values = _settings(a.preset, a.tiny)
  peak, peak_words = _peak(jax.devices()[0], a.peak_flops)
  rows = []
  for remat in remats:
    for k in ks:
      rows.append(bench_one(values, k, remat, a.updates))
      print(table(rows, peak, peak_words)[-1], flush=True)
  command = 'python -m experiments.gpu_bench ' + ' '.join(argv if argv is not None
                                                         else sys.argv[1:])
  text = '\n'.join([
      f'# {"tiny" if a.tiny else a.preset} on {jax.device_count()} x '
      f'{jax.devices()[0].device_kind}', '', f'`{command.strip()}`', '',
      *table(rows, peak, peak_words), ''])
  pathlib.Path(a.out).write_text(text)
  print(f'wrote {a.out}')
  return rows


if __name__ == '__main__':
  main()
