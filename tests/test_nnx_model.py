"""NnxModel: a flax.nnx module (BatchNorm included) trained by the train step, checked against
the module run eagerly by flax and against a plain full-batch reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import accumjax
from accumjax.nnx_model import NnxModel


class MLP(nnx.Module):
  def __init__(self, norm, rngs):
    self.lin1 = nnx.Linear(6, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs) if norm == 'batch' else \
        nnx.LayerNorm(16, rngs=rngs)
    self.lin2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.lin2(nnx.relu(self.norm(self.lin1(x))))


def _data(n=64, seed=0):
  rng = np.random.default_rng(seed)
  return {'x': jnp.asarray(rng.normal(size=(n, 6)), jnp.float32),
          'y': jnp.asarray(rng.integers(0, 3, n), jnp.int32),
          'w': jnp.asarray(rng.integers(0, 4, n), jnp.float32)}  # uneven weights, some 0


def _with_params(module, params):
  """The module with these params (flax's own calls; the reference does not use NnxModel)."""
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(module, state)
  return module


def _nll(logits, batch):
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])
  return jnp.sum(nll * batch['w']), jnp.sum(batch['w'])


def test_apply_is_the_module_run_by_flax():
  module = MLP('batch', nnx.Rngs(0))
  model = NnxModel(module)
  assert set(model.params) == {'lin1', 'norm', 'lin2'} and set(model.model_state) == {'norm'}
  batch = _data()
  out, new_state = jax.jit(model.apply)(model.params, model.model_state, batch['x'])
  eager = nnx.clone(module)
  eager.train()
  chex.assert_trees_all_close(out, eager(batch['x']), atol=1e-6)
  chex.assert_trees_all_close(new_state, nnx.to_pure_dict(nnx.state(eager, nnx.BatchStat)),
                              atol=1e-6)
  eager.eval()
  chex.assert_trees_all_close(model.module(model.params, new_state)(batch['x']),
                              eager(batch['x']), atol=1e-6)
  assert not np.allclose(new_state['norm']['mean'], 0)  # the averages moved


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_batchnorm_module_trains_in_every_mode_with_its_state(mode):
  """The trap this replaces: merging a split module by hand inside the step raised
  TraceContextError. Here the step runs, and the update equals the plain reference: SGD on
  the token-weighted sum of each micro-batch's loss (BatchNorm over each micro-batch), with
  the running averages the micro-batches' mean weighted by their loss weight
  (state_rules='mean')."""
  model = NnxModel(MLP('batch', nnx.Rngs(1)))
  batch, k, lr = _data(), 4, 0.1
  config = accumjax.AccumConfig(num_microbatches=k, microbatch_size=16, mode=mode)
  opt = optax.sgd(lr)
  loss_fn = model.loss_fn(_nll)
  state = accumjax.init_train_state(model.params, opt, 0, config,
                                    model_state=model.model_state, state_rules='mean')
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, opt, config,
                                                          state_rules='mean'))
  done = accumjax.run_update(step, state, accumjax.loop.split_calls(batch, config), config)

  def total(p):  # reference: written from flax directly, not from NnxModel
    sums, weights, states, ws = 0.0, 0.0, [], []
    for j in range(k):
      mb = jax.tree.map(lambda a, j=j: a[16 * j:16 * (j + 1)], batch)
      m = _with_params(MLP('batch', nnx.Rngs(1)), p)
      m.train()
      s, w = _nll(m(mb['x']), mb)
      sums, weights = sums + s, weights + w
      states.append(nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))
      ws.append(w)
    return sums / weights, (states, ws)

  grads, (states, ws) = jax.grad(total, has_aux=True)(model.params)
  want = jax.tree.map(lambda p, g: p - lr * g, model.params, grads)
  chex.assert_trees_all_close(done.state.params, want, atol=1e-6)
  chex.assert_trees_all_close(done.state.model_state,
                              jax.tree.map(lambda *s: sum(w * x for w, x in zip(ws, s, strict=True))
                                                        / sum(ws),
                                           *states), atol=1e-6)


def test_without_model_state_the_loss_takes_three_arguments_and_matches_the_big_batch():
  model = NnxModel(MLP('layer', nnx.Rngs(2)))
  assert model.model_state is None
  batch = _data(seed=3)
  config = accumjax.AccumConfig(num_microbatches=4, microbatch_size=16)
  opt = optax.sgd(0.1)
  loss_fn = model.loss_fn(_nll)
  state = accumjax.init_train_state(model.params, opt, 0, config)
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, opt, config))
  done = accumjax.run_update(step, state, accumjax.loop.split_calls(batch, config), config)

  def big(p):
    m = _with_params(MLP('layer', nnx.Rngs(2)), p)
    s, w = _nll(m(batch['x']), batch)
    return s / w

  want = jax.tree.map(lambda p, g: p - 0.1 * g, model.params, jax.grad(big)(model.params))
  chex.assert_trees_all_close(done.state.params, want, atol=1e-6)


def test_bad_inputs_are_config_errors():
  with pytest.raises(accumjax.ConfigError, match='module=dict'):
    NnxModel({'w': 1})
  model = NnxModel(MLP('batch', nnx.Rngs(0)))
  with pytest.raises(accumjax.ConfigError, match='model_state=None'):
    model.module(model.params)
