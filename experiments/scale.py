"""The model that does not fit one device: per-device memory and collectives of the sharded
train step, compile-only, on 8 fake CPU devices, beside the field's GSPMD baseline.

    python -m experiments.scale            # 85M and 1.2B, ~5 minutes on 2 CPU cores
    python -m experiments.scale --quick    # a 4-layer toy, ~1 minute (the test suite runs it)

Nothing is allocated or run: every step is lowered with abstract (ShapeDtypeStruct) state and
batch and compiled, and XLA's memory analysis of the compiled program is read
(`planner.compiled_memory`: temp + arguments + outputs - donated). The model is accumjax's LM
(layers stacked under one scan), seq 1024, K = 8 in scan mode, bfloat16 compute, AdamW; 85M is
d768 x 12 layers at micro-batch 2, 1.2B d2048 x 24 layers at micro-batch 1 (per device).

Rows: accumjax's train step on data=8 (replicated state), data=2 x fsdp=4 and fsdp=8, under
each gather ('call': params gathered once per call, then `--fsdp-reduce call|microbatch`;
'layer': one layer at a time) and remat policy; and the baseline compiled in the same run
(`baseline_step` below: params sharded with NamedSharding over `fsdp`, a plain `jax.jit`, the
same layer-scanned model, the micro-batch scan's gradient carry constrained to the params'
sharding, AdamW on the shards; `remat full` checkpoints each layer with `nothing_saveable`).
Collectives are counted in the compiled HLO by loop depth: 0 outside every loop, 1 in the
micro-batch loop, 2 in a layer loop. `estimate` is accumjax's own account of the live set per
device (`state.live_bytes_per_device`, what the banner and config.json show) next to XLA's.
Writes benchmarks/scale.md with the command.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import argparse  # noqa: E402 (XLA_FLAGS must be set before jax starts)
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import accumjax  # noqa: E402
from accumjax import parallel, planner  # noqa: E402
from accumjax.lm import model  # noqa: E402
from accumjax.lm.build import make_loss_fn  # noqa: E402
from experiments import hlo  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
K = 8
SIZES = {
    '85M': dict(d_model=768, num_layers=12, num_heads=12, seq=1024, b=2),
    '1.2B': dict(d_model=2048, num_layers=24, num_heads=16, seq=1024, b=1),
    'toy': dict(d_model=64, num_layers=4, num_heads=4, seq=64, b=2),
}
MESHES = {'data=8': (8, 1), 'data=2,fsdp=4': (2, 4), 'fsdp=8': (1, 8)}
# (mesh, gather, reduce, remat); 'baseline' in the gather column: the GSPMD baseline.
VARIANTS = (
    ('data=8', None, None, 'none'),
    ('data=2,fsdp=4', 'call', 'call', 'none'),
    ('data=2,fsdp=4', 'call', 'microbatch', 'none'),
    ('data=2,fsdp=4', 'layer', None, 'none'),
    ('fsdp=8', 'call', 'call', 'none'),
    ('fsdp=8', 'call', 'microbatch', 'none'),
    ('fsdp=8', 'layer', None, 'none'),
    ('fsdp=8', 'baseline', None, 'none'),
    ('fsdp=8', 'layer', None, 'dots'),
    ('fsdp=8', 'layer', None, 'full'),
    ('fsdp=8', 'baseline', None, 'full'),
)


def _model_config(size: str, remat: str):
  dims = SIZES[size]
  return model.ModelConfig(d_model=dims['d_model'], num_layers=dims['num_layers'],
                           num_heads=dims['num_heads'], max_len=dims['seq'], remat=remat)


def _model(size: str, remat: str):
  apply, params = model.make_lm(_model_config(size, remat), abstract=True)
  return make_loss_fn(apply), params


def _batch(rows: int, seq: int, sharding):
  shape = lambda dtype: jax.ShapeDtypeStruct((rows, seq), dtype, sharding=sharding)
  return {'inputs': shape(jnp.int32), 'targets': shape(jnp.int32), 'mask': shape(jnp.float32)}


def _optimizer():
  return optax.adamw(1e-4, b2=0.95, weight_decay=0.1)


def accumjax_step(size: str, mesh_name: str, gather, reduce, remat: str):
  """(jitted step, abstract args, estimate) of accumjax's scan-mode train step."""
  dims = SIZES[size]
  mesh = parallel.make_mesh(*MESHES[mesh_name])
  loss_fn, params = _model(size, remat)
  config = accumjax.AccumConfig(
      num_microbatches=K, microbatch_size=dims['b'], compute_dtype='bfloat16',
      seq_len=dims['seq'], num_devices=mesh.size, fsdp_gather=gather or 'call',
      fsdp_reduce=reduce or 'call')
  tx = accumjax.accumulating_optimizer(_optimizer(), config)
  state = jax.eval_shape(lambda p: accumjax.init_train_state(p, tx, 0, config), params)
  state = parallel.abstract_state(state, mesh)
  batch = _batch(K * dims['b'] * mesh.size, dims['seq'], parallel.batch_sharding(mesh))
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config, mesh=mesh))
  estimate = model.live_set(_model_config(size, remat), state, config, parallel.fsdp_size(mesh))
  return step, (state, batch), {'last_call': True}, estimate['total']


def baseline_step(params, opt_state, batch, *, loss_fn, tx, param_shardings):
  """The field's baseline: plain jit over sharded params; XLA's partitioner decides every
  collective. Micro-batches on the leading axis of `batch`; the gradient carry is pinned to the
  params' sharding; one AdamW update of the token-weighted mean gradient."""
  compute = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)

  def body(carry, mb):
    grads, loss_sum, weight = carry
    (mb_loss, mb_weight), g = jax.value_and_grad(lambda p: loss_fn(p, mb, None), has_aux=True)(
        compute)
    grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
    grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    return (grads, loss_sum + mb_loss, weight + mb_weight), None

  zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), param_shardings)
  (grads, loss_sum, weight), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), batch)
  grads = jax.tree.map(lambda g: g / weight, grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss_sum / weight


def baseline(size: str, mesh_name: str, remat: str):
  dims = SIZES[size]
  mesh = parallel.make_mesh(*MESHES[mesh_name])
  loss_fn, params = _model(size, remat)
  f = parallel.fsdp_size(mesh)
  shardings = jax.tree.map(lambda p: NamedSharding(mesh, parallel.leaf_spec(p.shape, f)), params)
  tx = _optimizer()
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = jax.tree.map(
      lambda x: NamedSharding(mesh, parallel.leaf_spec(x.shape, f)), opt_state)
  place = lambda tree, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  rows = dims['b'] * mesh.size
  split = NamedSharding(mesh, PartitionSpec(None, parallel.AXES))
  batch = {name: jax.ShapeDtypeStruct((K,) + x.shape, x.dtype, sharding=split)
           for name, x in _batch(rows, dims['seq'], None).items()}
  step = jax.jit(lambda p, o, b: baseline_step(p, o, b, loss_fn=loss_fn, tx=tx,
                                                param_shardings=shardings),
                 donate_argnums=(0, 1), out_shardings=(shardings, opt_shardings, None))
  return step, (place(params, shardings), place(opt_state, opt_shardings), batch), {}, None


def measure(size: str, mesh_name: str, gather, reduce, remat: str) -> dict:
  start = time.perf_counter()
  if gather == 'baseline':
    step, args, kwargs, estimate = baseline(size, mesh_name, remat)
  else:
    step, args, kwargs, estimate = accumjax_step(size, mesh_name, gather, reduce, remat)
  compiled = step.lower(*args, **kwargs).compile()
  seconds = time.perf_counter() - start
  memory = planner.memory_of(compiled)
  return {'size': size, 'mesh': mesh_name, 'gather': gather or '-', 'reduce': reduce or '-',
          'remat': remat, 'temp': memory['temp'], 'total': memory['total'],
          'estimate': estimate, 'compile_s': seconds,
          'collectives': hlo.collectives_by_depth(compiled.as_text())}


def _gb(n) -> str:
  return '-' if n is None else f'{n / 1e9:.2f}'


def _collectives(counts: dict) -> str:
  """'all-gather 1/0/12' (outside / micro-batch loop / layer loop), per op present."""
  short = {'all-gather': 'AG', 'all-reduce': 'AR', 'reduce-scatter': 'RS', 'all-to-all': 'A2A',
           'collective-permute': 'CP'}
  return ', '.join(f'{short[op]} ' + '/'.join(str(by.get(d, 0)) for d in range(3))
                   for op, by in sorted(counts.items()))


def table(rows: list[dict]) -> list[str]:
  lines = ['| size | mesh | gather | fsdp reduce | remat | XLA temp GB | XLA total GB | '
           'estimate GB (/ XLA) | vs baseline | collectives (outside / micro-batch loop / '
           'layer loop) | compile s |', '|' + '---|' * 11]
  for r in rows:
    base = next((b for b in rows if b['size'] == r['size'] and b['mesh'] == r['mesh'] and
                 b['gather'] == 'baseline' and b['remat'] == r['remat']), None)
    ratio = f'{r["total"] / base["total"]:.2f}' if base else '-'
    est = '-' if r['estimate'] is None else (
        f'{_gb(r["estimate"])} ({r["estimate"] / r["total"]:.2f})')
    lines.append(
        f'| {r["size"]} | {r["mesh"]} | {r["gather"]} | {r["reduce"]} | {r["remat"]} | '
        f'{_gb(r["temp"])} | {_gb(r["total"])} | {est} | {ratio} | '
        f'{_collectives(r["collectives"])} | {r["compile_s"]:.0f} |')
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='a 4-layer toy model only')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'scale.md'))
  args = parser.parse_args(argv)
  if jax.device_count() < 8:
    sys.exit(f'experiments.scale needs 8 devices; this process has {jax.device_count()} '
             '(XLA_FLAGS=--xla_force_host_platform_device_count=8).')
  rows = []
  for size in ('toy',) if args.quick else ('85M', '1.2B'):
    for variant in VARIANTS:
      rows.append(measure(size, *variant))
      print(table(rows)[-1], flush=True)
  command = 'python -m experiments.scale' + (' --quick' if args.quick else '')
  text = '\n'.join([
      '# Per-device memory of the sharded step: one layer at a time vs once per call',
      '', f'`{command}` (compile-only, 8 fake CPU devices; see the module docstring).', '',
      *table(rows), ''])
  pathlib.Path(args.out).write_text(text)
  print(f'wrote {args.out}')
  return rows


if __name__ == '__main__':
  main()
