"""Accumulation equals one big batch: every mode x K x optimizer against the plain reference."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accumjax
from tests import reference
from tests.helpers import lm_loss, run_accumjax

ROWS = 48  # divisible by every K below
TOL = 1e-5
STEPS = 3


def sgd():
  return optax.sgd(0.5, momentum=0.9)


def adamw():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 2, STEPS + 1)
  return optax.adamw(schedule, weight_decay=0.1)


OPTIMIZERS = {'sgd': sgd, 'adamw': adamw}


def config_for(mode, k, rows=ROWS, **kw):
  per_call = {'hybrid': k // 2 if k % 2 == 0 and k > 2 else 1}.get(mode)
  return accumjax.AccumConfig(
      num_microbatches=k, microbatch_size=rows // k, mode=mode,
      microbatches_per_call=per_call, **kw)


@functools.cache
def reference_result(opt_name):
  params, losses = reference.run_reference(
      reference.init_params(), reference.make_batches(STEPS, ROWS), OPTIMIZERS[opt_name]())
  return params, losses


MAX_ERRORS = {}


@pytest.mark.parametrize('opt_name', ['sgd', 'adamw'])
@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
@pytest.mark.parametrize('k', [1, 2, 3, 4, 8])
def test_matches_full_batch(k, mode, opt_name):
  ref_params, ref_losses = reference_result(opt_name)
  config = config_for(mode, k)
  state, losses, _ = run_accumjax(
      reference.init_params(), reference.make_batches(STEPS, ROWS), OPTIMIZERS[opt_name](),
      config)
  assert len(losses) == STEPS
  chex.assert_trees_all_close(state.params, ref_params, rtol=TOL, atol=1e-6)
  np.testing.assert_allclose(losses, ref_losses, rtol=TOL)
  assert reference.rel_err(state.params, ref_params) <= TOL
  MAX_ERRORS[(k, mode, opt_name)] = reference.rel_err(state.params, ref_params)


def test_token_counts_really_differ_between_microbatches():
  # Guards the test data itself: without unequal counts the suite could not see weighting bugs.
  mask = reference.make_batches(1, ROWS)[0]['mask']
  counts = mask.reshape(8, -1).sum(axis=1)
  assert counts.max() > 3 * counts.min(), counts


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_microbatch_order_does_not_matter(mode):
  batches = reference.make_batches(STEPS, ROWS)
  perm = np.random.default_rng(1).permutation(8)

  def permute(batch):
    return jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:])[perm].reshape(x.shape), batch)

  config = config_for(mode, 8)
  a, _, _ = run_accumjax(reference.init_params(), batches, adamw(), config)
  b, _, _ = run_accumjax(reference.init_params(), [permute(x) for x in batches], adamw(), config)
  chex.assert_trees_all_close(a.params, b.params, rtol=TOL, atol=1e-6)


def _mean_of_means_grad(params, batch, k):
  """The classic bug: average the K micro-batch mean gradients."""
  mbs = accumjax.split_microbatches(batch, k)
  grads = [jax.grad(reference.full_batch_loss)(params, jax.tree.map(lambda x, i=i: x[i], mbs))
           for i in range(k)]
  return jax.tree.map(lambda *g: sum(g) / k, *grads)


def test_suite_catches_mean_of_means():
  params = reference.init_params()
  batch = reference.make_batches(1, ROWS)[0]
  ref = jax.grad(reference.full_batch_loss)(params, batch)
  good, _ = accumjax.accumulate_gradients(
      lm_loss, params, batch, num_microbatches=8, rng=None)
  bad = _mean_of_means_grad(params, batch, 8)
  assert reference.rel_err(good, ref) <= TOL
  assert reference.rel_err(bad, ref) > 100 * TOL
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(bad, ref, rtol=TOL, atol=1e-6)


def test_suite_catches_multisteps_running_mean():
  # optax.MultiSteps' default (use_grad_mean=True) fed per-call mean gradients weighs every
  # call equally: the multisteps test above must be able to see that.
  params = reference.init_params()
  batches = reference.make_batches(1, ROWS)
  ref_params, _ = reference.run_reference(params, batches, sgd())
  tx = optax.MultiSteps(sgd(), every_k_schedule=8)
  state = tx.init(params)
  mbs = accumjax.split_microbatches(batches[0], 8)
  p = params
  for i in range(8):
    g = jax.grad(reference.full_batch_loss)(p, jax.tree.map(lambda x, i=i: x[i], mbs))
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
  assert reference.rel_err(p, ref_params) > 100 * TOL
  ours, _, _ = run_accumjax(params, batches, sgd(), config_for('multisteps', 8))
  assert reference.rel_err(ours.params, ref_params) <= TOL


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_bf16_compute_float32_accumulation(mode):
  ref_params, _ = reference_result('adamw')
  config = config_for(mode, 4, compute_dtype='bfloat16')
  state, _, calls = run_accumjax(
      reference.init_params(), reference.make_batches(STEPS, ROWS), adamw(), config)
  chex.assert_trees_all_close(state.params, ref_params, rtol=1e-2, atol=1e-2)
  assert reference.rel_err(state.params, ref_params) < 1e-2
  chex.assert_trees_all_equal_dtypes(state.params, reference.init_params())
  if mode != 'scan':
    acc = state.cycle.sums
    chex.assert_trees_all_equal_dtypes(acc.grads, reference.init_params())
    assert acc.weight.dtype == jnp.float32 and acc.loss_sum.dtype == jnp.float32
  # And the bf16 run really did compute in bf16: it is not bitwise the fp32 run.
  assert reference.rel_err(state.params, ref_params) > 0


def test_core_accumulates_in_float32_for_bf16_params():
  params = accumjax.cast_floats(reference.init_params(), jnp.bfloat16)
  batch = reference.make_batches(1, ROWS)[0]
  sums, _ = accumjax.accumulate_sums(lm_loss, params, batch, num_microbatches=4)
  for g in jax.tree.leaves(sums.grads):
    assert g.dtype == jnp.float32
  assert sums.loss_sum.dtype == jnp.float32 and sums.weight.dtype == jnp.float32
  assert float(sums.weight) == float(batch['mask'].sum())


def test_accumulate_gradients_eager_equals_jit():
  params = reference.init_params()
  batch = reference.make_batches(1, ROWS)[0]
  fn = functools.partial(accumjax.accumulate_gradients, lm_loss, num_microbatches=4)
  g1, m1 = fn(params, batch)
  g2, m2 = jax.jit(fn)(params, batch)
  chex.assert_trees_all_close(g1, g2, rtol=1e-6, atol=1e-7)
  ref_loss, ref = jax.value_and_grad(reference.full_batch_loss)(params, batch)
  chex.assert_trees_all_close(g1, ref, rtol=TOL, atol=1e-7)
  np.testing.assert_allclose(float(m1['loss']), float(ref_loss), rtol=TOL)
  assert float(m1['weight']) == float(batch['mask'].sum())
