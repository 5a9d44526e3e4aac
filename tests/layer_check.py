"""Helper for tests/test_layer_gather.py: the 'layer' FSDP gather on 4 fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.layer_check DIR

Prints one JSON line. Runs in its own process because the device count is fixed at start-up.
"""

import dataclasses
import json
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

import accumjax
from accumjax import checkpoint, parallel
from accumjax.lm import model
from accumjax.lm.build import make_loss_fn
from experiments import hlo
from tests import fsdp_check, reference
from tests.fsdp_check import MODES, K, build, calls, train
from tests.test_equivalence import OPTIMIZERS, ROWS, STEPS
from tests.test_nonfinite import faulty_loss

LM = model.ModelConfig(d_model=32, num_layers=3, num_heads=2, max_len=16)
SEQ = 16


def reference_model():
  """The test reference model (no layer scan) under the 'layer' gather: the partitioner's
  collectives, the group micro-batches and the carry, against the full-batch reference."""
  ref = jax.device_get(reference.run_reference(
      reference.init_params(), reference.make_batches(STEPS, ROWS), OPTIMIZERS['adamw']())[0])
  one, _ = train('scan', '1 device')
  errors, layouts = {}, {}
  for mode in MODES:
    for mesh_name in ('fsdp=4', 'data=2,fsdp=2'):
      params, layout = train(mode, mesh_name, fsdp_gather='layer')
      errors[f'{mode}/{mesh_name} vs reference'] = reference.rel_err(params, ref)
      errors[f'{mode}/{mesh_name} vs 1 device'] = reference.rel_err(params, one)
      layouts[f'{mode}/{mesh_name}'] = layout
  # The bug the data x fsdp rows must catch: the groups' sums never meet over `data`.
  with mock.patch.object(jax.lax, 'psum', lambda x, axis_name: x):
    bug = reference.rel_err(train('scan', 'data=2,fsdp=2', fsdp_gather='layer')[0], ref)
  return {'errors': {k: float(v) for k, v in errors.items()}, 'layouts': layouts,
          'no_data_sum_error': float(bug)}


def lm_batches(updates, rows, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(updates):
    tokens = rng.integers(1, LM.vocab_size, size=(rows, SEQ + 1))
    lengths = np.sort(rng.integers(1, SEQ + 1, size=rows))[::-1]
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.float32)
    out.append({'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
                'targets': jnp.asarray(tokens[:, 1:], jnp.int32), 'mask': jnp.asarray(mask)})
  return out


def lm_run(mesh_name, gather, precision='float32', remat='none', updates=2):
  """The scanned LM: `updates` scan-mode updates (SGD with momentum: AdamW's division by
  sqrt(v) turns the last bits of a near-zero gradient into whole steps, which would hide
  the comparison); (params, losses, compiled HLO text)."""
  data, fsdp = fsdp_check.MESHES[mesh_name]
  devices = data * fsdp
  apply, params = model.make_lm(dataclasses.replace(LM, remat=remat), seed=0)
  config = accumjax.AccumConfig(num_microbatches=K, microbatch_size=8 // devices,
                                compute_dtype=precision, num_devices=devices, fsdp_gather=gather)
  tx = accumjax.accumulating_optimizer(optax.sgd(0.5, momentum=0.9), config)
  mesh = parallel.make_mesh(data, fsdp)
  step = accumjax.jit_train_step(accumjax.make_train_step(
      make_loss_fn(apply), tx, config, mesh=mesh if devices > 1 else None))
  state = parallel.place_state(accumjax.init_train_state(params, tx, 0, config), mesh)
  losses, text = [], None
  for batch in lm_batches(updates, K * 8):
    call = parallel.shard_batch(batch, mesh)
    if text is None:
      text = step.lower(state, call, last_call=True).compile().as_text()
    state, metrics = step(state, call, last_call=True)
    losses.append(float(metrics['loss']))
  return jax.device_get(state.params), losses, text


def lm_checks():
  one, one_losses, _ = lm_run('1 device', 'call')
  out = {'one_device_losses': one_losses}
  for gather in ('call', 'layer'):
    params, losses, text = lm_run('fsdp=4', gather)
    out[gather] = {'error_vs_1_device': float(reference.rel_err(params, one)), 'losses': losses,
                   'collectives': hlo.collectives_by_depth(text)}
  bf_one, bf_losses, _ = lm_run('1 device', 'call', 'bfloat16')
  params, losses, text = lm_run('data=2,fsdp=2', 'layer', 'bfloat16')
  out['bf16'] = {'error_vs_1_device': float(reference.rel_err(params, bf_one)),
                 'losses': losses, 'one_device_losses': bf_losses,
                 'collectives': hlo.collectives_by_depth(text)}
  params, losses, _ = lm_run('fsdp=4', 'layer', remat='full')
  out['layer_full_remat'] = {'error_vs_1_device': float(reference.rel_err(params, one)),
                             'losses': losses}
  return out


def restore_call_into_layer(directory):
  """multisteps, K=4, fsdp=4: 'call' trains 1 update + 2 calls and saves mid-cycle; 'layer'
  restores it and finishes; against an uninterrupted 'call' run."""
  batches = reference.make_batches(2, ROWS)
  ckpt = checkpoint.Checkpointer(directory, keep=None)
  config, mesh, fresh, step = build('multisteps', 'fsdp=4')
  state = parallel.place_state(fresh, mesh)
  state = accumjax.run_update(step, state, calls(batches[0], config, mesh), config).state
  for c in calls(batches[1], config, mesh)[:2]:
    state = step(state, c, last_call=False)[0]
  ckpt.save(state, {})
  ckpt.wait()
  config, mesh, fresh, step = build('multisteps', 'fsdp=4', fsdp_gather='layer')
  state = ckpt.restore(lambda meta: parallel.abstract_state(fresh, mesh)).state
  ckpt.close()
  for c in calls(batches[1], config, mesh)[2:]:
    state = step(state, c, last_call=None)[0]
  _, _, fresh, step = build('multisteps', 'fsdp=4')
  ref = parallel.place_state(fresh, mesh)
  for batch in batches:
    ref = accumjax.run_update(step, ref, calls(batch, config, mesh), config).state
  return {'error_vs_uninterrupted': float(reference.rel_err(
      jax.device_get(state.params), jax.device_get(ref.params))),
      'updates': int(state.update_step)}


def nan_in_one_group(j=1, device=2):
  """A NaN in micro-batch j on one device of fsdp=4 under the 'layer' gather (scan,
  skip_microbatch, sgd): the whole group's micro-batch j (the j-th chunk of every device's
  rows) is left out, and the rest is the big-batch update, finite everywhere."""
  config, mesh, fresh, step = build('scan', 'fsdp=4', opt_name='sgd', loss_fn=faulty_loss,
                                    nonfinite='skip_microbatch', fsdp_gather='layer')
  b, per_device = config.microbatch_size, ROWS // 4
  fault = np.ones(ROWS, np.float32)
  fault[device * per_device + j * b:device * per_device + (j + 1) * b] = np.nan
  batch = dict(reference.make_batches(1, ROWS)[0], fault=fault)
  done = accumjax.run_update(step, parallel.place_state(fresh, mesh),
                             calls(batch, config, mesh), config)
  params = jax.device_get(done.state.params)
  dropped = np.concatenate([np.arange(d * per_device + j * b, d * per_device + (j + 1) * b)
                            for d in range(4)])
  keep = np.setdiff1d(np.arange(ROWS), dropped)
  remaining = jax.tree.map(lambda x: x[keep], reference.make_batches(1, ROWS)[0])
  ref = reference.run_reference(reference.init_params(), [remaining], OPTIMIZERS['sgd']())
  return {'error_vs_remaining': float(reference.rel_err(params, ref[0])),
          'finite': bool(all(np.isfinite(x).all() for x in jax.tree.leaves(params))),
          'nonfinite': float(done.metrics['nonfinite'])}


def main(directory):
  print(json.dumps({
      'devices': jax.device_count(),
      'reference_model': reference_model(),
      'lm': lm_checks(),
      'restore': restore_call_into_layer(directory),
      'nan_in_one_group': nan_in_one_group(),
  }))


if __name__ == '__main__':
  main(sys.argv[1])
