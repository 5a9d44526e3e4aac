"""Helper for tests/test_parallel.py: data-parallel updates on 1, 2 and 4 devices, and the
cross-device collectives in the compiled train steps.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.dp_check

Prints one JSON line. Runs in its own process because the device count is fixed at start-up.
"""

import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import accumjax
from accumjax import parallel
from experiments import hlo
from experiments.naive_dp import plain_jit_step
from tests import reference
from tests.helpers import calls_of, lm_loss
from tests.test_equivalence import OPTIMIZERS, ROWS, STEPS
from tests.test_nonfinite import faulty_loss

K = 4
MODES = {'scan': None, 'multisteps': None, 'hybrid': 2}


def config_for(mode, devices, **kw):
  return accumjax.AccumConfig(
      num_microbatches=K, microbatch_size=ROWS // (K * devices), mode=mode,
      microbatches_per_call=MODES[mode], num_devices=devices, **kw)


def build(mode, devices, opt_name, loss_fn=lm_loss, **kw):
  config = config_for(mode, devices, **kw)
  mesh = parallel.make_mesh(devices)
  tx = accumjax.accumulating_optimizer(OPTIMIZERS[opt_name](), config)
  state = parallel.replicate(
      accumjax.init_train_state(reference.init_params(), tx, 0, config), mesh)
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config, mesh=mesh))
  return config, mesh, state, step


def sharded_calls(batch, config, mesh):
  return [parallel.shard_batch(call, mesh) for call in calls_of(batch, config)]


def train(mode, devices, opt_name, **kw):
  config, mesh, state, step = build(mode, devices, opt_name, **kw)
  for batch in reference.make_batches(STEPS, ROWS):
    state = accumjax.run_update(step, state, sharded_calls(batch, config, mesh), config).state
  return jax.device_get(state.params)


def mean_of_device_means(out, axis_name):
  """The bug the equivalence must catch: each device divides by its own weight first."""
  sums, bad = out
  n = real_psum(1, axis_name)
  means = accumjax.GradSums(
      jax.tree.map(lambda g: g / sums.weight, sums.grads), sums.loss_sum / sums.weight,
      jnp.ones_like(sums.weight), sums.nonfinite)
  return jax.tree.map(lambda x: real_psum(x, axis_name) / n, means), real_psum(bad, axis_name)


real_psum = jax.lax.psum


def device_weights(devices):
  """Real tokens on each device in every call of the first update (scan mode)."""
  mask = reference.make_batches(1, ROWS)[0]['mask']
  return mask.reshape(devices, -1).sum(axis=1).tolist()


def collectives(mode, devices, **kw):
  config, mesh, state, step = build(mode, devices, 'adamw', **kw)
  call = parallel.shard_batch(calls_of(reference.make_batches(1, ROWS)[0], config)[0], mesh)
  compiled = step.lower(state, call, last_call=config.calls_per_update == 1).compile()
  return {'per_call': hlo.collective_counts(compiled.as_text()),
          'calls_per_update': config.calls_per_update}


def faults(mode, policy, value=float('nan'), compute_dtype='float32', j=1, device=2):
  """A fault (`value` times the loss) in micro-batch j of the first update on one device of 4,
  then a clean update (sgd). Returns the params after each update, the last metrics of each
  and the rows the fault hit (in the global batch)."""
  config, mesh, state, step = build(mode, 4, 'sgd', loss_fn=faulty_loss, nonfinite=policy,
                                    compute_dtype=compute_dtype)
  b = config.microbatch_size
  rows = config.per_call * b * 4  # one call, device-major
  start = (j // config.per_call) * rows + device * (rows // 4) + (j % config.per_call) * b
  fault = np.ones(ROWS, np.float32)
  fault[start:start + b] = value
  params, metrics = [], []
  for u, batch in enumerate(reference.make_batches(2, ROWS)):
    batch = dict(batch, fault=fault if u == 0 else np.ones(ROWS, np.float32))
    done = accumjax.run_update(step, state, sharded_calls(batch, config, mesh), config)
    state, m = done.state, done.metrics
    params.append(jax.device_get(state.params))
    metrics.append({k: float(m[k]) for k in (
        'updated', 'skipped', 'nonfinite', 'first_nonfinite', 'skipped_updates',
        'nonfinite_microbatches', 'loss_scale', 'loss')})
  metrics.append({'loss_scale_after': float(state.loss_scale)})
  return params, metrics, (start, start + b)


def fault_results():
  params0 = jax.device_get(reference.init_params())
  first = reference.make_batches(2, ROWS)[0]
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  out = {}
  for mode in MODES:
    for policy in ('skip_update', 'skip_microbatch'):
      params, metrics, (lo, hi) = faults(mode, policy)
      result = {'metrics': metrics, 'finite_after': bool(all(
          np.isfinite(x).all() for p in params for x in jax.tree.leaves(p)))}
      if policy == 'skip_update':
        result['unchanged'] = same(params[0], params0)
        result['second_moved'] = not same(params[1], params0)
      else:
        keep = np.r_[0:lo, hi:ROWS]
        remaining = jax.tree.map(lambda x, keep=keep: x[keep], first)
        ref = reference.run_reference(reference.init_params(), [remaining], OPTIMIZERS['sgd']())
        result['error_vs_remaining'] = float(reference.rel_err(params[0], ref[0]))
      out[f'{mode}/{policy}'] = result
  params, metrics, _ = faults('scan', 'skip_update', value=1e6, compute_dtype='float16')
  out['scan/fp16 overflow'] = {'metrics': metrics, 'unchanged': same(params[0], params0),
                               'second_moved': not same(params[1], params0)}
  return out


def naive_collectives(devices):
  config = config_for('scan', devices)
  mesh = parallel.make_mesh(devices)
  tx = accumjax.accumulating_optimizer(OPTIMIZERS['adamw'](), config)
  state = parallel.replicate(accumjax.init_train_state(reference.init_params(), tx, 0), mesh)
  step = plain_jit_step(lm_loss, tx, config, mesh)
  batches = reference.make_batches(STEPS, ROWS)
  counts = hlo.collective_counts(
      step.lower(state, parallel.shard_batch(batches[0], mesh)).compile().as_text())
  for batch in batches:
    state, _ = step(state, parallel.shard_batch(batch, mesh))
  return counts, jax.device_get(state.params)


def noise_stats(mode, devices=4):
  """The first update's gradient noise statistics with `devices` devices (K per device)."""
  config, mesh, state, step = build(mode, devices, 'sgd', noise_stats=True)
  batch = reference.make_batches(1, ROWS)[0]
  m = accumjax.run_update(step, state, sharded_calls(batch, config, mesh), config).metrics
  return {key: float(m[key]) for key in ('g_sq', 'trace_sigma', 'b_simple')}


def main():
  ref = {name: jax.device_get(reference.run_reference(
      reference.init_params(), reference.make_batches(STEPS, ROWS), OPTIMIZERS[name]())[0])
      for name in OPTIMIZERS}
  errors = {}
  for mode in MODES:
    for opt_name in ('adamw', 'sgd') if mode == 'scan' else ('adamw',):
      results = {d: train(mode, d, opt_name) for d in (1, 2, 4)}
      for d, params in results.items():
        errors[f'{mode}/{opt_name}/{d} vs reference'] = reference.rel_err(params, ref[opt_name])
        errors[f'{mode}/{opt_name}/{d} vs 1 device'] = reference.rel_err(params, results[1])
  ordered = train('hybrid', 4, 'adamw', dp_reduction='ordered')
  errors['hybrid/adamw/4 ordered vs reference'] = reference.rel_err(ordered, ref['adamw'])
  with mock.patch.object(jax.lax, 'psum', mean_of_device_means):
    bug = train('scan', 4, 'adamw')
  naive_counts, naive_params = naive_collectives(4)
  fp16 = {d: train('scan', d, 'adamw', compute_dtype='float16') for d in (1, 4)}
  print(json.dumps({
      'devices': jax.device_count(),
      'errors': {k: float(v) for k, v in errors.items()},
      'mean_of_device_means_error': float(reference.rel_err(bug, ref['adamw'])),
      'device_weights': {d: device_weights(d) for d in (2, 4)},
      'collectives': {
          mode: collectives(mode, 4) for mode in MODES},
      'collectives_ordered': collectives('scan', 4, dp_reduction='ordered'),
      'naive': {'collectives': naive_counts,
                'error': float(reference.rel_err(naive_params, ref['adamw']))},
      'tokens_differ_within_rows': bool(np.ptp(device_weights(4)) > 0),
      'faults': fault_results(),
      'noise': {mode: noise_stats(mode) for mode in MODES},
      'fp16': {
          '4 vs 1 device': float(reference.rel_err(fp16[4], fp16[1])),
          '1 vs fp32 reference': float(reference.rel_err(fp16[1], ref['adamw'])),
          '4 vs fp32 reference': float(reference.rel_err(fp16[4], ref['adamw']))},
  }))


if __name__ == '__main__':
  main()
