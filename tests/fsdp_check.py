"""Helper for tests/test_fsdp.py: sharded (FSDP) updates on 4 fake CPU devices, their compiled
collectives and memory, and checkpoints restored across meshes.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.fsdp_check DIR

Prints one JSON line. Runs in its own process because the device count is fixed at start-up.
"""

import json
import sys
from unittest import mock

import jax
import numpy as np

import accumjax
from accumjax import checkpoint, parallel
from accumjax import state as state_lib
from experiments import hlo
from tests import reference
from tests.helpers import calls_of, lm_loss
from tests.test_equivalence import OPTIMIZERS, ROWS, STEPS
from tests.test_nonfinite import faulty_loss

K = 4
MODES = {'scan': None, 'multisteps': None, 'hybrid': 2}
MESHES = {'1 device': (1, 1), 'data=4': (4, 1), 'fsdp=4': (1, 4), 'data=2,fsdp=2': (2, 2)}
POLICIES = ('call', 'microbatch')


def build(mode, mesh_name, policy='call', opt_name='adamw', microbatch_size=None,
          loss_fn=lm_loss, **kw):
  data, fsdp = MESHES[mesh_name]
  devices = data * fsdp
  config = accumjax.AccumConfig(
      num_microbatches=K, microbatch_size=microbatch_size or ROWS // (K * devices), mode=mode,
      microbatches_per_call=MODES[mode], num_devices=devices, fsdp_reduce=policy, **kw)
  mesh = parallel.make_mesh(data, fsdp)
  tx = accumjax.accumulating_optimizer(OPTIMIZERS[opt_name](), config)
  fresh = accumjax.init_train_state(reference.init_params(), tx, 0, config)
  step = accumjax.jit_train_step(accumjax.make_train_step(
      loss_fn, tx, config, mesh=mesh if devices > 1 else None))
  return config, mesh, fresh, step


def calls(batch, config, mesh):
  return [parallel.shard_batch(c, mesh) for c in calls_of(batch, config)]


def train(mode, mesh_name, policy='call', **kw):
  config, mesh, fresh, step = build(mode, mesh_name, policy, **kw)
  state = parallel.place_state(fresh, mesh)
  for batch in reference.make_batches(STEPS, ROWS):
    state = accumjax.run_update(step, state, calls(batch, config, mesh), config).state
  specs = {name: str(leaf.sharding.spec) for name, leaf in state.params.items()}
  shard_shapes = {name: list(leaf.addressable_shards[0].data.shape)
                  for name, leaf in state.params.items()}
  # the cycle's gradient sums (its scalars stay on the device; scan mode keeps no cycle)
  kinds = sorted({str(x.sharding.memory_kind) for x in jax.tree.leaves(
      None if state.cycle is None else state.cycle.sums.grads)})
  return jax.device_get(state.params), {'specs': specs, 'shard_shapes': shard_shapes,
                                        'accumulator_memory': kinds}


def compiled(mode, mesh_name, policy):
  """Collectives of every program of the step (interim and last call) and the memory analysis
  of the last call's, per device."""
  config, mesh, fresh, step = build(mode, mesh_name, policy)
  state = parallel.place_state(fresh, mesh)
  call = calls(reference.make_batches(1, ROWS)[0], config, mesh)[0]
  out = {}
  for last in (True,) if config.calls_per_update == 1 else (False, True):
    program = step.lower(state, call, last_call=last).compile()
    memory = program.memory_analysis()
    batch_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(call))
    out['last' if last else 'interim'] = {
        'collectives': hlo.collective_counts(program.as_text()),
        'state_argument_bytes': memory.argument_size_in_bytes - batch_bytes,
        'temp_bytes': memory.temp_size_in_bytes}
  out['state_bytes'] = state_lib.state_bytes_per_device(state)
  return out


def restore_across_meshes(directory):
  """multisteps, K=4: fsdp=4 trains 1 update + 2 calls and saves mid-cycle; data=2,fsdp=2
  restores it, does 1 call and saves; one device (micro-batch 4x as large: same global rows
  per call) restores that and finishes update 2 and 3. Compared with one uninterrupted
  one-device run."""
  batches = reference.make_batches(3, ROWS)
  ckpt = checkpoint.Checkpointer(directory, keep=None)
  out = {}

  config, mesh, fresh, step = build('multisteps', 'fsdp=4')
  state = parallel.place_state(fresh, mesh)
  state = accumjax.run_update(step, state, calls(batches[0], config, mesh), config).state
  for c in calls(batches[1], config, mesh)[:2]:
    state = step(state, c, last_call=False)[0]
  saved = ckpt.save(state, {})
  ckpt.wait()
  out['saved'] = {'step': saved, 'fingerprint': checkpoint.fingerprint(state),
                  'cycle_microbatch': int(state.cycle.microbatches)}

  config, mesh, fresh, step = build('multisteps', 'data=2,fsdp=2')
  restored = ckpt.restore(lambda meta: parallel.abstract_state(fresh, mesh))
  state = restored.state
  acc = state.cycle.sums.grads['w1']
  out['data=2,fsdp=2'] = {
      'fingerprint': checkpoint.fingerprint(state),
      'params_spec': str(state.params['w1'].sharding.spec),
      'accumulator_spec': str(acc.sharding.spec),
      'accumulator_shard': list(acc.addressable_shards[0].data.shape),
      'mesh': dict(state.params['w1'].sharding.mesh.shape)}
  state = step(state, calls(batches[1], config, mesh)[2], last_call=False)[0]
  ckpt.save(state, {})
  ckpt.wait()

  config, mesh, fresh, step = build('multisteps', '1 device', microbatch_size=ROWS // K)
  state = ckpt.restore(lambda meta: parallel.abstract_state(fresh, mesh)).state
  out['1 device'] = {'cycle_microbatch': int(state.cycle.microbatches),
                     'devices': len(state.params['w1'].sharding.device_set)}
  state = step(state, calls(batches[1], config, mesh)[3], last_call=True)[0]
  state = accumjax.run_update(step, state, calls(batches[2], config, mesh), config).state
  ckpt.close()

  _, _, fresh, step = build('multisteps', '1 device', microbatch_size=ROWS // K)
  ref = fresh
  for batch in batches:
    ref = accumjax.run_update(step, ref, calls_of(batch, config), config).state
  out['error_vs_uninterrupted'] = float(reference.rel_err(
      jax.device_get(state.params), jax.device_get(ref.params)))
  out['updates'] = int(state.update_step)
  return out


def nan_on_one_device(policy, j=1, device=2):
  """A NaN in micro-batch j on one device of fsdp=4 (scan, skip_microbatch, sgd): the update is
  the big-batch update of the other rows, finite everywhere. (A NaN reduce-scattered before it
  was masked would reach every device's shard.)"""
  config, mesh, fresh, step = build('scan', 'fsdp=4', policy, opt_name='sgd',
                                    loss_fn=faulty_loss, nonfinite='skip_microbatch')
  b = config.microbatch_size
  start = device * (ROWS // 4) + j * b
  fault = np.ones(ROWS, np.float32)
  fault[start:start + b] = np.nan
  batch = dict(reference.make_batches(1, ROWS)[0], fault=fault)
  done = accumjax.run_update(step, parallel.place_state(fresh, mesh),
                             calls(batch, config, mesh), config)
  params = jax.device_get(done.state.params)
  keep = np.r_[0:start, start + b:ROWS]
  remaining = jax.tree.map(lambda x: x[keep], reference.make_batches(1, ROWS)[0])
  ref = reference.run_reference(reference.init_params(), [remaining], OPTIMIZERS['sgd']())
  return {'error_vs_remaining': float(reference.rel_err(params, ref[0])),
          'finite': bool(all(np.isfinite(x).all() for x in jax.tree.leaves(params))),
          'nonfinite': float(done.metrics['nonfinite']), 'skipped': bool(done.metrics['skipped'])}


def unsummed_scatter(x, axis_name, *, scatter_dimension=0, tiled=False):
  """The bug the equivalence must catch: each device keeps a slice of its own sums instead of
  the sum over the fsdp axis."""
  del axis_name, tiled
  return jax.lax.slice_in_dim(x, 0, x.shape[scatter_dimension] // 4, axis=scatter_dimension)


def main(directory):
  ref = jax.device_get(reference.run_reference(
      reference.init_params(), reference.make_batches(STEPS, ROWS), OPTIMIZERS['adamw']())[0])
  errors, layouts = {}, {}
  for mode in MODES:
    one, _ = train(mode, '1 device')
    errors[f'{mode}/1 device vs reference'] = reference.rel_err(one, ref)
    for mesh_name in ('fsdp=4', 'data=2,fsdp=2'):
      for policy in POLICIES:
        params, layout = train(mode, mesh_name, policy)
        name = f'{mode}/{mesh_name}/{policy}'
        errors[f'{name} vs reference'] = reference.rel_err(params, ref)
        errors[f'{name} vs 1 device'] = reference.rel_err(params, one)
        layouts[name] = layout
  for mode in ('multisteps', 'hybrid'):  # the accumulator between calls in host memory
    params, layout = train(mode, 'fsdp=4', 'microbatch', accumulator_memory='host')
    errors[f'{mode}/fsdp=4/microbatch/host accumulator vs reference'] = \
        reference.rel_err(params, ref)
    layouts[f'{mode}/fsdp=4/microbatch/host accumulator'] = layout
  with mock.patch.object(jax.lax, 'psum_scatter', unsummed_scatter):
    bug = {policy: float(reference.rel_err(train('scan', 'fsdp=4', policy)[0], ref))
           for policy in POLICIES}
  programs = {f'{mode}/{mesh_name}/{policy}': compiled(mode, mesh_name, policy)
              for mode in MODES for mesh_name in ('data=4', 'fsdp=4', 'data=2,fsdp=2')
              for policy in (POLICIES if mesh_name != 'data=4' else ('call',))}
  print(json.dumps({
      'devices': jax.device_count(),
      'errors': {k: float(v) for k, v in errors.items()},
      'unsummed_scatter_error': bug,
      'layouts': layouts,
      'programs': programs,
      'restore': restore_across_meshes(directory),
      'nan_on_one_device': {policy: nan_on_one_device(policy) for policy in POLICIES},
  }))


if __name__ == '__main__':
  main(sys.argv[1])
