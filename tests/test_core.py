"""Behaviour of the core around the equivalence: MultiSteps interim calls, schedules, clipping,
RNG, partial cycles, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accumjax
from tests import reference
from tests.helpers import calls_of, lm_loss, run_accumjax
from tests.test_equivalence import ROWS, TOL, adamw, config_for, sgd


@pytest.mark.parametrize('mode,k', [('multisteps', 4), ('hybrid', 4)])
def test_interim_calls_leave_params_unchanged(mode, k):
  params = reference.init_params()
  _, _, calls = run_accumjax(params, reference.make_batches(2, ROWS), sgd(), config_for(mode, k))
  per_update = config_for(mode, k).calls_per_update
  prev = params
  for i, (state, metrics) in enumerate(calls):
    last_of_cycle = (i + 1) % per_update == 0
    assert bool(metrics['updated']) == last_of_cycle
    if last_of_cycle:
      with pytest.raises(AssertionError):
        chex.assert_trees_all_close(state.params, prev)
    else:
      chex.assert_trees_all_equal(state.params, prev)
    prev = state.params


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_schedule_advances_once_per_update(mode):
  seen = []

  def schedule(count):
    jax.debug.callback(lambda c: seen.append(int(c)), count)
    return 0.1 / (1.0 + count)

  config = config_for(mode, 4)
  state, _, _ = run_accumjax(
      reference.init_params(), reference.make_batches(3, ROWS), optax.sgd(schedule), config)
  assert _counts(state.opt_state) == [3]
  assert int(state.update_step) == 3
  # The schedule is evaluated at 0, 1, 2 on the updates that fire (MultiSteps also evaluates
  # it on interim calls, whose results are discarded: the count there is the pending one).
  ref, _ = reference.run_reference(
      reference.init_params(), reference.make_batches(3, ROWS),
      optax.sgd(lambda c: 0.1 / (1.0 + c)))
  chex.assert_trees_all_close(state.params, ref, rtol=TOL, atol=1e-6)
  assert sorted(set(seen)) == [0, 1, 2]


def _counts(opt_state):
  return [int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, 'count')]


def _clip(tree, c):
  norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))
  return jax.tree.map(lambda x: x * jnp.minimum(1.0, c / norm), tree)


CLIP = 0.05


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_clip_after_accumulation_clips_the_big_batch_gradient(mode):
  params = reference.init_params()
  batches = reference.make_batches(1, ROWS)
  g = jax.grad(reference.full_batch_loss)(params, batches[0])
  assert float(optax.tree.norm(g)) > 2 * CLIP  # the clip is active
  expected = jax.tree.map(lambda p, u: p - 1.0 * u, params, _clip(g, CLIP))
  state, _, _ = run_accumjax(params, batches, optax.sgd(1.0), config_for(mode, 4, clip_norm=CLIP))
  chex.assert_trees_all_close(state.params, expected, rtol=TOL, atol=1e-7)


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_clip_before_accumulation_clips_each_microbatch(mode):
  params = reference.init_params()
  batches = reference.make_batches(1, ROWS)
  mbs = accumjax.split_microbatches(batches[0], 4)
  clipped, weights = [], []
  for i in range(4):
    mb = jax.tree.map(lambda x, i=i: x[i], mbs)
    clipped.append(_clip(jax.grad(reference.full_batch_loss)(params, mb), CLIP))
    weights.append(float(mb['mask'].sum()))
  total = sum(weights)
  mean = jax.tree.map(
      lambda *g: sum(w * x for w, x in zip(weights, g, strict=True)) / total, *clipped)
  expected = jax.tree.map(lambda p, u: p - u, params, mean)
  config = config_for(mode, 4, clip_norm=CLIP, clip_before_accumulation=True)
  state, _, _ = run_accumjax(params, batches, optax.sgd(1.0), config)
  chex.assert_trees_all_close(state.params, expected, rtol=TOL, atol=1e-7)
  after, _, _ = run_accumjax(params, batches, optax.sgd(1.0), config_for(mode, 4, clip_norm=CLIP))
  assert reference.rel_err(state.params, after.params) > 100 * TOL  # the two really differ


def _noise_loss(params, batch, rng):
  noise = jax.random.uniform(rng, ())
  loss_sum, weight = lm_loss(params, batch, None)
  return loss_sum, weight, noise


def test_rng_differs_per_microbatch_and_is_reproducible():
  params = reference.init_params()
  batch = reference.make_batches(1, ROWS)[0]
  key = jax.random.key(3)
  _, m1 = accumjax.accumulate_gradients(_noise_loss, params, batch, num_microbatches=8, rng=key)
  _, m2 = accumjax.accumulate_gradients(_noise_loss, params, batch, num_microbatches=8, rng=key)
  noise = np.asarray(m1['aux'])
  assert noise.shape == (8,) and len(set(noise.tolist())) == 8
  np.testing.assert_array_equal(noise, np.asarray(m2['aux']))


def test_dropout_masks_are_the_same_in_every_mode():
  # Micro-batch j of update u gets fold_in(fold_in(rng, u), j) whichever mode split the cycle.
  def dropout_loss(params, batch, rng):
    logits = reference.logits_fn(params, batch['inputs'], rng, rate=0.3)
    return accumjax.token_cross_entropy(logits, batch['targets'], batch['mask'])

  batches = reference.make_batches(2, ROWS)
  results = [
      run_accumjax(reference.init_params(), batches, sgd(), config_for(m, 4), dropout_loss)[0]
      .params for m in ('scan', 'multisteps', 'hybrid')]
  no_dropout, _, _ = run_accumjax(
      reference.init_params(), reference.make_batches(2, ROWS), sgd(), config_for('scan', 4))
  chex.assert_trees_all_close(results[0], results[1], rtol=TOL, atol=1e-6)
  chex.assert_trees_all_close(results[0], results[2], rtol=TOL, atol=1e-6)
  assert reference.rel_err(results[0], no_dropout.params) > 1e-3


@pytest.mark.parametrize('mode', ['multisteps', 'hybrid'])
def test_partial_final_cycle_flushes_as_one_update(mode):
  config = config_for(mode, 8)  # micro-batch of 6 rows; hybrid scans 4 per call
  params = reference.init_params()
  batch = reference.make_batches(1, ROWS)[0]
  rows = 3 * config.microbatch_size  # data ends after 3 of the 4 micro-batches
  partial = jax.tree.map(lambda x: x[:rows], batch)
  ref, _ = reference.run_reference(params, [partial], sgd())
  tx = accumjax.accumulating_optimizer(sgd(), config)
  state = accumjax.init_train_state(params, tx, jax.random.key(0))
  step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config), donate=False)
  flush = jax.jit(accumjax.make_flush(tx, config))
  # Without a flush the driver stops where the data ended: nothing applied yet.
  cut = accumjax.run_update(step, state, calls_of(partial, config), config)
  assert cut.exhausted and not cut.complete and not bool(cut.metrics['updated'])
  chex.assert_trees_all_equal(cut.state.params, params)
  # With one, the partial cycle is its own update, exact for the micro-batches it had.
  done = accumjax.run_update(step, state, calls_of(partial, config), config, flush=flush)
  assert done.exhausted and done.complete and bool(done.metrics['updated'])
  state = done.state
  chex.assert_trees_all_close(state.params, ref, rtol=TOL, atol=1e-6)
  np.testing.assert_allclose(float(done.metrics['loss']), reference.full_batch_loss(
      params, partial), rtol=TOL)
  assert int(state.update_step) == 1 and int(state.cycle.microbatches) == 0
  # Flushing again changes nothing.
  again, metrics = flush(state)
  assert not bool(metrics['updated'])
  chex.assert_trees_all_equal(again.params, state.params)


def test_partial_final_cycle_in_scan_mode_is_a_shorter_call():
  config = config_for('scan', 4)
  params = reference.init_params()
  batch = reference.make_batches(1, ROWS)[0]
  partial = jax.tree.map(lambda x: x[:3 * config.microbatch_size], batch)
  ref, _ = reference.run_reference(params, [partial], sgd())
  state, _, _ = run_accumjax(params, [partial], sgd(), config)
  chex.assert_trees_all_close(state.params, ref, rtol=TOL, atol=1e-6)


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_zero_weight_update_is_skipped_not_nan(mode):
  params = reference.init_params()
  batches = reference.make_batches(2, ROWS)
  batches[0] = dict(batches[0], mask=jnp.zeros_like(batches[0]['mask']))
  state, _, calls = run_accumjax(params, batches[:1], adamw(), config_for(mode, 4))
  chex.assert_trees_all_equal(state.params, params)
  assert bool(calls[-1][1]['skipped'])
  assert _counts(state.opt_state) == [0, 0]  # adam moments and schedule both untouched
  # The run goes on normally, with the schedule where a fresh run has it.
  state, _, _ = run_accumjax(params, batches, adamw(), config_for(mode, 4))
  ref, _ = reference.run_reference(params, batches[1:], adamw())
  chex.assert_trees_all_close(state.params, ref, rtol=TOL, atol=1e-6)


def test_hybrid_default_c_is_half_an_even_k_else_one():
  for k, c in ((4, 2), (8, 4), (6, 3), (5, 1)):
    config = accumjax.AccumConfig(num_microbatches=k, microbatch_size=2, mode='hybrid')
    assert (config.microbatches_per_call, config.per_call, config.calls_per_update) == \
        (None, c, k // c)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_microbatches=0, microbatch_size=4), 'num_microbatches=0 must be an int >= 1'),
    (dict(num_microbatches=-2, microbatch_size=4), 'num_microbatches=-2'),
    (dict(num_microbatches=2.0, microbatch_size=4), 'num_microbatches=2.0 must be an int >= 1'),
    (dict(num_microbatches=4, microbatch_size=0), 'microbatch_size=0'),
    (dict(num_microbatches=4, microbatch_size=4, mode='pipeline'), "mode='pipeline'; allowed"),
    (dict(num_microbatches=4, microbatch_size=4, mode='hybrid', microbatches_per_call=3),
     r'c=3, allowed: \[1, 2, 4\]'),
    (dict(num_microbatches=4, microbatch_size=4, mode='scan', microbatches_per_call=2),
     'conflicts with mode'),
    (dict(num_microbatches=4, microbatch_size=4, compute_dtype='float8'), "compute_dtype='float8'"),
    (dict(num_microbatches=4, microbatch_size=4, clip_norm=-1.0),
     'clip_norm=-1.0 must be a positive finite number'),
    # Wrong types are refused too, not coerced (a truthy string, a float size, a string number).
    (dict(num_microbatches=4, microbatch_size=4, clip_norm=1.0,
          clip_before_accumulation='False'), "clip_before_accumulation='False' must be True or"),
    (dict(num_microbatches=4, microbatch_size=4, seq_len=12.5), 'seq_len=12.5 must be an int'),
    (dict(num_microbatches=4, microbatch_size=4, clip_norm='1.0'), "clip_norm='1.0' must be a"),
    (dict(num_microbatches=4, microbatch_size=4, clip_norm=float('inf')), 'clip_norm=inf must'),
    (dict(num_microbatches=4, microbatch_size=4, initial_loss_scale=float('nan')),
     'initial_loss_scale=nan'),
    (dict(num_microbatches=4, microbatch_size=4, mode=None), 'mode=None; allowed'),
    (dict(num_microbatches=4, microbatch_size=True), 'microbatch_size=True must be an int'),
    (dict(num_microbatches=4, microbatch_size=4, clip_before_accumulation=True),
     'needs a clip_norm'),
])
def test_bad_configs_raise(kwargs, match):
  with pytest.raises(accumjax.ConfigError, match=match):
    accumjax.AccumConfig(**kwargs)


def test_bad_inputs_raise_before_any_computation():
  params = reference.init_params()
  batch = reference.make_batches(1, 10)[0]
  with pytest.raises(accumjax.ConfigError, match=(
      r'batch size 10 is not divisible by num_microbatches=4; '
      r'allowed num_microbatches for this batch: \[1, 2, 5, 10\]')):
    accumjax.accumulate_gradients(lm_loss, params, batch, num_microbatches=4)
  with pytest.raises(accumjax.ConfigError, match='num_microbatches=0'):
    accumjax.accumulate_gradients(lm_loss, params, batch, num_microbatches=0)
  int_params = dict(params, b1=jnp.zeros((reference.HIDDEN,), jnp.int32))
  with pytest.raises(accumjax.ConfigError, match=r"params\['b1'\] has dtype int32"):
    accumjax.accumulate_gradients(lm_loss, int_params, batch, num_microbatches=2)
  with pytest.raises(accumjax.ConfigError, match='must return \\(loss_sum, weight\\)'):
    accumjax.accumulate_gradients(lambda p, b, r: 1.0, params, batch, num_microbatches=2)
  config = config_for('multisteps', 4)
  tx = accumjax.accumulating_optimizer(sgd(), config)
  step = accumjax.make_train_step(lm_loss, tx, config)
  state = accumjax.init_train_state(params, tx, jax.random.key(0))
  with pytest.raises(accumjax.ConfigError, match='got 10 rows'):
    step(state, batch)


def test_describe():
  config = accumjax.AccumConfig(
      num_microbatches=8, microbatch_size=4, mode='hybrid', microbatches_per_call=2,
      compute_dtype='bfloat16', clip_norm=1.0, seq_len=128, num_devices=2)
  d = accumjax.describe(config)
  assert d['effective_batch'] == 64 and d['tokens_per_update'] == 64 * 128
  assert d['calls_per_update'] == 4 and d['microbatches_per_call'] == 2
  assert d['compute_dtype'] == 'bfloat16' and d['accum_dtype'] == 'float32'
  assert d['clipping'] == 'accumulated mean gradient to 1.0'
  assert all(isinstance(v, (int, str, type(None))) for v in d.values())
  tx = accumjax.accumulating_optimizer(optax.sgd(0.1), config)
  state = accumjax.init_train_state({'w': jnp.ones((4, 8))}, tx, 0)
  d = accumjax.describe(config, state)
  assert (d['params_bytes_per_device'], d['accumulator_bytes_per_device'],
          d['call_accumulator_bytes_per_device']) == (128, 128 + 12 + 8, 128)  # + 2 counters
