"""Under the default policy ('skip_update') the core checks each micro-batch's loss and weight
and the update's gradient sum once, instead of every micro-batch's gradient: the same updates,
the same skips, a non-finite gradient still counted. A micro-batch whose *gradient alone* is
non-finite (finite loss) is the case that tells the two checks apart."""

import chex
import jax
import jax.extend
import jax.numpy as jnp
import optax
import pytest

import accumjax

X = jax.random.normal(jax.random.key(0), (32, 3))
DATA = {'x': X, 'y': X[:, :1], 'bad': jnp.zeros(32).at[10].set(1.0)}  # row 10: micro-batch 1
PARAMS = {'w': jnp.full((3, 1), 0.2)}


def loss_fn(params, batch, rng):
  """Finite everywhere, but the gradient of micro-batch 1 is NaN (sqrt at 0 times the flag)."""
  del rng
  per_row = jnp.sum((batch['x'] @ params['w'] - batch['y']) ** 2, axis=-1)
  poison = jax.lax.cond(jnp.sum(batch['bad']) > 0,  # only the flagged micro-batch's branch
                        lambda w: jnp.sqrt(jnp.sum(w * 0.0)),  # value 0, gradient NaN
                        lambda w: jnp.float32(0.0), params['w'])
  return jnp.sum(per_row) + poison, jnp.float32(batch['x'].shape[0])


def train(policy, mode, data=DATA):
  config = accumjax.AccumConfig(num_microbatches=4, microbatch_size=8, mode=mode,
                                nonfinite=policy, noise_stats=True)
  opt = optax.sgd(0.1)
  state = accumjax.init_train_state(PARAMS, opt, 0, config)
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, opt, config))
  return config, accumjax.run_update(step, state, accumjax.loop.split_calls(data, config), config)


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_a_gradient_only_nan_skips_the_update_and_is_counted(mode):
  config, done = train('skip_update', mode)
  assert not config.masks_microbatches
  m = done.metrics
  assert bool(m['skipped']) and int(m['nonfinite']) == 1 and int(m['first_nonfinite']) == -1
  chex.assert_trees_all_equal(done.state.params, PARAMS)  # never poisoned
  assert int(done.state.skipped_updates) == 1 and int(done.state.nonfinite_microbatches) == 1
  assert jnp.isfinite(m['loss'])  # the loss sums stay finite (their scalars were)


@pytest.mark.parametrize('mode', ['scan', 'hybrid'])
def test_skip_microbatch_and_raise_still_find_the_micro_batch(mode):
  for policy in ('skip_microbatch', 'raise'):
    config, done = train(policy, mode)
    assert config.masks_microbatches
    assert int(done.metrics['nonfinite']) == 1 and int(done.metrics['first_nonfinite']) == 1
  clean = dict(DATA, bad=jnp.zeros(32))
  keep = jnp.arange(32) // 8 != 1  # the update of the other three micro-batches

  def mean(p):
    per_row = jnp.sum((clean['x'] @ p['w'] - clean['y']) ** 2, axis=-1)
    return jnp.sum(per_row * keep) / jnp.sum(keep)
  want = jax.tree.map(lambda p, g: p - 0.1 * g, PARAMS, jax.grad(mean)(PARAMS))
  chex.assert_trees_all_close(train('skip_microbatch', mode)[1].state.params, want, atol=1e-6)


def test_with_finite_gradients_both_checks_give_the_same_update_bitwise():
  clean = dict(DATA, bad=jnp.zeros(32))
  a = train('skip_update', 'hybrid', clean)[1]
  b = train('raise', 'hybrid', clean)[1]
  chex.assert_trees_all_equal(a.state.params, b.state.params)


def test_accumulate_gradients_without_masking_reports_the_nan_instead_of_dropping_it():
  masked, m1 = accumjax.accumulate_gradients(loss_fn, PARAMS, DATA, num_microbatches=4)
  assert int(m1['nonfinite']) == 1 and jnp.all(jnp.isfinite(masked['w']))
  raw, m2 = accumjax.accumulate_gradients(loss_fn, PARAMS, DATA, num_microbatches=4,
                                          mask_microbatches=False)
  assert int(m2['nonfinite']) == 1 and not jnp.all(jnp.isfinite(raw['w']))


def huge_loss(params, batch, rng):
  """A finite loss whose gradient is finite but so large that its squared norm overflows
  float32 (each entry ~1e20, squares ~1e40 > 3.4e38)."""
  del rng
  per_row = jnp.sum((batch['x'] @ params['w'] - batch['y']) ** 2, axis=-1)
  return jnp.sum(per_row) * 1e20, jnp.float32(batch['x'].shape[0])


@pytest.mark.parametrize('mode', ['scan', 'hybrid'])
def test_a_huge_finite_gradient_is_applied_not_counted_as_nonfinite(mode):
  """The one check of the sum reads their squared norm; an overflow of that norm alone (every
  entry finite) must not skip the update (the tree is then read again to tell)."""
  config = accumjax.AccumConfig(num_microbatches=4, microbatch_size=8, mode=mode)
  opt = optax.sgd(1e-21)
  state = accumjax.init_train_state(PARAMS, opt, 0, config)
  step = accumjax.jit_train_step(accumjax.make_train_step(huge_loss, opt, config))
  done = accumjax.run_update(step, state, accumjax.loop.split_calls(DATA, config), config)
  assert not bool(done.metrics['skipped']) and int(done.metrics['nonfinite']) == 0
  mean = lambda p: huge_loss(p, DATA, None)[0] / 32.0
  want = jax.tree.map(lambda p, g: p - 1e-21 * g, PARAMS, jax.grad(mean)(PARAMS))
  chex.assert_trees_all_close(done.state.params, want, rtol=1e-5)
  assert not jnp.isfinite(done.metrics['grad_norm'] ** 2)  # the norm's square did overflow


def _array_ops(jaxpr, in_cond=False):
  """(primitive name, operand shapes, inside a cond branch) of every equation, nested jaxprs
  included."""
  for eqn in jaxpr.eqns:
    shapes = [getattr(v.aval, 'shape', ()) for v in eqn.invars]
    yield eqn.primitive.name, shapes, in_cond
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _array_ops(sub, in_cond or eqn.primitive.name == 'cond')


@pytest.mark.parametrize('clip_norm', [None, 1.0])
def test_the_completing_step_reads_the_gradient_sums_in_one_check_and_divides_by_a_scalar(
    clip_norm):
  """The program that completes an update (step.apply_cycle) neither runs an is-finite check
  over the gradient outside the rare overflow branch (a finite squared norm proves the sums
  finite) nor divides a gradient-sized array (the division is one scalar's reciprocal,
  multiplied in where XLA fuses it into the optimizer's passes)."""
  from accumjax import step as step_lib
  config = accumjax.AccumConfig(num_microbatches=1, microbatch_size=1, clip_norm=clip_norm)
  params = {'w': jnp.ones((64, 32)), 'b': jnp.ones((32,))}
  opt = optax.sgd(0.1, momentum=0.9)  # (AdamW divides on its own: its bias correction)
  tx = accumjax.accumulating_optimizer(opt, config)
  state = accumjax.init_train_state(params, opt, 0, config)
  sums = accumjax.GradSums(params, jnp.float32(3.0), jnp.float32(2.0), jnp.float32(0.0))
  cycle = step_lib.Cycle(sums, jnp.int32(1), jnp.int32(-1))
  jaxpr = jax.make_jaxpr(lambda st, s: step_lib.apply_cycle(tx, config, st, s, cycle))(
      state, sums).jaxpr
  ops = list(_array_ops(jaxpr))
  big = lambda shapes: any(len(s) >= 1 and s[0] >= 32 for s in shapes)
  assert not [op for op in ops if op[0] == 'is_finite' and big(op[1]) and not op[2]]
  assert [op for op in ops if op[0] == 'is_finite' and big(op[1]) and op[2]]  # the rare branch
  assert not [op for op in ops if op[0] == 'div' and big(op[1])]
  reads = [op for op in ops if op[0] == 'reduce_sum' and (64, 32) in op[1] and not op[2]]
  assert len(reads) == 1  # the one squared norm (metric, clip and check)
