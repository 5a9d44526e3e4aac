"""Every way found to wire the public functions together wrongly: each is a ConfigError that
names the argument where the mistake is, or the math is still the big batch's. No silent wrong
math (each case here was silent, or a TypeError from inside JAX, before)."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import accumjax

X = jax.random.normal(jax.random.key(0), (64, 4))
DATA = {'x': X, 'y': jnp.sin(X[:, :1]), 'm': (jnp.arange(64) % 3).astype(jnp.float32)}
PARAMS = {'w': jnp.full((4, 1), 0.1)}
LR = 0.1


def loss_fn(params, batch, rng):
  del rng
  per_row = jnp.sum((batch['x'] @ params['w'] - batch['y']) ** 2, axis=-1)
  return jnp.sum(per_row * batch['m']), jnp.sum(batch['m'])


def stateful_loss(params, batch, rng, model_state):
  """A model state that is the max/sum of a per-row statistic (rule decides)."""
  (s, w) = loss_fn(params, batch, rng)
  return (s, w), {'c': jnp.max(batch['x'][:, 0]) - 3.0}


def big_batch_sgd():  # the reference: plain jax.grad of the weighted mean, one SGD step
  def mean_loss(p):
    s, w = loss_fn(p, DATA, None)
    return s / w
  return jax.tree.map(lambda p, g: p - LR * g, PARAMS, jax.grad(mean_loss)(PARAMS))


def train(config, state_config='same', loss=loss_fn, init_kw=None, step_kw=None,
          optimizer=None, data=DATA):
  opt = optimizer or optax.sgd(LR)
  state_config = config if state_config == 'same' else state_config
  state = accumjax.init_train_state(PARAMS, opt, 0, state_config, **(init_kw or {}))
  step = accumjax.jit_train_step(accumjax.make_train_step(loss, opt, config, **(step_kw or {})))
  return accumjax.run_update(step, state, accumjax.loop.split_calls(data, config), config)


def cfg(mode='multisteps', **kw):
  return accumjax.AccumConfig(num_microbatches=4, microbatch_size=16, mode=mode,
                              microbatches_per_call=2 if mode == 'hybrid' else None, **kw)


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_a_plain_optax_optimizer_gives_the_big_batch_update(mode):
  chex.assert_trees_all_close(train(cfg(mode)).state.params, big_batch_sgd(), atol=1e-6)


def test_optimizers_built_for_accumulation_elsewhere_are_refused():
  with pytest.raises(accumjax.ConfigError, match='optax.MultiSteps: pass the plain optimizer'):
    train(cfg(), optimizer=optax.MultiSteps(optax.sgd(LR), 4))
  for other in (cfg('scan', clip_norm=1.0), cfg(nonfinite='skip_microbatch'),
                cfg(multisteps_impl='optax')):
    built = accumjax.accumulating_optimizer(optax.sgd(LR), other)
    with pytest.raises(accumjax.ConfigError, match='built for another AccumConfig'):
      accumjax.make_train_step(loss_fn, built, cfg())
  # one built for the same optimizer setup (another layout of the batch) is the same optimizer
  for same in (cfg(), cfg('scan')):
    tx = accumjax.accumulating_optimizer(optax.sgd(LR), same)
    chex.assert_trees_all_close(train(cfg(), optimizer=tx).state.params, big_batch_sgd(),
                                atol=1e-6)


def test_a_state_made_for_another_mode_or_without_config_still_gives_the_big_batch():
  for state_config in (cfg('scan'), None):
    done = train(cfg(noise_stats=True), state_config=state_config)
    chex.assert_trees_all_close(done.state.params, big_batch_sgd(), atol=1e-6)
    assert jnp.isfinite(done.metrics['b_simple'])


def test_a_loss_fn_with_the_wrong_arguments_is_refused_at_make_train_step():
  def two_args(params, batch):
    return loss_fn(params, batch, None)
  with pytest.raises(accumjax.ConfigError, match=r"loss_fn='two_args' must take 3 positional "
                     r'arguments \(params, batch, rng\); its signature is \(params, batch\)'):
    accumjax.make_train_step(two_args, optax.sgd(LR), cfg())
  with pytest.raises(accumjax.ConfigError, match='must take 4 positional arguments'):
    accumjax.make_train_step(loss_fn, optax.sgd(LR), cfg(), state_rules='sum')
  with pytest.raises(accumjax.ConfigError, match='must take 3 positional'):
    accumjax.accumulate_gradients(two_args, PARAMS, DATA, num_microbatches=4)


def test_a_batch_of_strings_is_refused_naming_the_leaf():
  with pytest.raises(accumjax.ConfigError, match=r"batch\['name'\]\[0\] is a str"):
    train(cfg(), data=dict(DATA, name=['a'] * 64))


def test_model_state_and_state_rules_must_come_together():
  state_kw = dict(model_state={'c': jnp.zeros(())}, state_rules='sum')
  with pytest.raises(accumjax.ConfigError, match='disagree about the model state'):
    train(cfg(), init_kw=state_kw)
  with pytest.raises(accumjax.ConfigError, match='disagree about the model state'):
    train(cfg(), loss=stateful_loss, step_kw=dict(state_rules='sum'))


@pytest.mark.parametrize('mode', ['multisteps', 'hybrid'])
def test_the_step_s_state_rules_rule_whatever_rules_made_the_state(mode):
  """init_train_state(state_rules='sum') then make_train_step(state_rules='max') gave 0.0 (the
  'sum' accumulator's start) where 'max' gives the largest proposal (-3 + max x)."""
  want = jnp.max(X[:, 0]) - 3.0
  for init_rules in ('sum', 'max', 'mean'):
    done = train(cfg(mode), loss=stateful_loss, step_kw=dict(state_rules='max'),
                 init_kw=dict(model_state={'c': jnp.zeros(())}, state_rules=init_rules))
    chex.assert_trees_all_close(done.state.model_state['c'], want, atol=1e-6)


def test_a_loss_fn_that_forgets_the_new_model_state_is_a_clear_error():
  def forgets(params, batch, rng, model_state):
    del model_state
    return loss_fn(params, batch, rng)
  with pytest.raises(accumjax.ConfigError, match=r'must return \(\(loss_sum, weight\[, aux\]\), '
                     r'new_model_state\); got a 2-tuple'):
    train(cfg(), loss=forgets, step_kw=dict(state_rules='sum'),
          init_kw=dict(model_state={'c': jnp.zeros(())}, state_rules='sum'))

  def reshapes(params, batch, rng, model_state):
    return loss_fn(params, batch, rng), {'c': model_state['c'], 'd': model_state['c']}
  with pytest.raises(accumjax.ConfigError, match='returned a new model state shaped'):
    train(cfg(), loss=reshapes, step_kw=dict(state_rules='sum'),
          init_kw=dict(model_state={'c': jnp.zeros(())}, state_rules='sum'))


def test_every_rng_argument_takes_what_init_train_state_takes():
  def noisy(params, batch, rng):
    s, w = loss_fn(params, batch, rng)
    return s * (1 + 0.1 * jax.random.uniform(rng)), w
  by_int, _ = accumjax.accumulate_gradients(noisy, PARAMS, DATA, num_microbatches=4, rng=7)
  by_key, _ = accumjax.accumulate_gradients(noisy, PARAMS, DATA, num_microbatches=4,
                                            rng=jax.random.key(7))
  chex.assert_trees_all_equal(by_int, by_key)
  with pytest.raises(accumjax.ConfigError, match="rng='seed'; allowed"):
    accumjax.accumulate_gradients(noisy, PARAMS, DATA, num_microbatches=4, rng='seed')
