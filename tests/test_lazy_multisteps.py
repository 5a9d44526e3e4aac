"""LazyMultiSteps as a drop-in for optax.MultiSteps in plain optax code (besides optax's own
tests in test_optax_multisteps.py): same params and state as optax over whole runs, for every
option, inside chain and inject_hyperparams, with bf16 params; clear errors for bad settings."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accumjax
from accumjax import loop
from tests import reference
from tests.helpers import calls_of, lm_loss
from tests.test_equivalence import ROWS, config_for


def _grads(n, params, seed=0):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
          for _ in range(n)]


def _run(wrapper, grads, params, jit=True, **kw):
  tx = wrapper(**kw)
  init, update = tx.gradient_transformation()
  update = jax.jit(update) if jit else update
  state = init(params)
  history = []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    history.append((params, state, bool(tx.has_updated(state))))
  return history


def _same(a, b, rtol=1e-6):
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_dtypes(a, b)
  ints = lambda t: [x for x in jax.tree.leaves(t) if not jnp.issubdtype(x.dtype, jnp.floating)]
  chex.assert_trees_all_equal(ints(a), ints(b))
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=1e-7)


SCHEDULE = lambda step: jnp.where(step < 2, 2, 3)  # K changes between cycles
OPTIONS = {
    'mean, int K': dict(every_k_schedule=3),
    'sum, int K': dict(every_k_schedule=3, use_grad_mean=False),
    'numpy int K': dict(every_k_schedule=np.int64(4)),
    'callable K': dict(every_k_schedule=SCHEDULE),
    'skip_not_finite': dict(every_k_schedule=2, should_skip_update_fn=optax.skip_not_finite),
    'bf16 accumulator': dict(every_k_schedule=2, accumulator_dtype=jnp.bfloat16),
}


@pytest.mark.parametrize('name', list(OPTIONS))
def test_same_params_and_state_as_optax_every_call(name):
  params = reference.init_params()
  grads = _grads(13, params)
  if name == 'skip_not_finite':
    grads[4] = jax.tree.map(lambda g: g * jnp.nan, grads[4])
  inner = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  kw = OPTIONS[name]
  ours = _run(lambda **k: accumjax.LazyMultiSteps(inner(), **k), grads, params, **kw)
  if isinstance(kw['every_k_schedule'], np.integer):  # optax itself takes only Python ints
    kw = dict(kw, every_k_schedule=int(kw['every_k_schedule']))
  ref = _run(lambda **k: optax.MultiSteps(inner(), **k), grads, params, **kw)
  assert [h[2] for h in ours] == [h[2] for h in ref]
  assert sum(h[2] for h in ref) >= 3  # several updates happened
  for (p1, s1, _), (p2, s2, _) in zip(ours, ref, strict=True):
    _same(p1, p2)
    _same(s1, s2)


def test_inside_chain_and_inject_hyperparams_with_no_params():
  params = {'w': jnp.ones((3, 4)), 'b': jnp.zeros((4,))}
  grads = _grads(6, params)

  def build(wrapper):
    ms = wrapper(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), every_k_schedule=3)
    return optax.chain(optax.scale(2.0), ms.gradient_transformation())

  results = []
  for wrapper in (accumjax.LazyMultiSteps, optax.MultiSteps):
    tx = build(wrapper)
    state, p = tx.init(params), params
    for g in grads:
      updates, state = jax.jit(tx.update)(g, state)  # params=None: sgd needs none
      p = optax.apply_updates(p, updates)
    results.append((p, state))
  _same(results[0], results[1])
  assert not np.allclose(results[0][0]['w'], params['w'])  # the updates did happen


def test_bf16_params_keep_their_dtypes_and_compile_once():
  # The inner state (adam moments in bf16) and the float32 accumulator keep their dtypes on
  # both branches: no lax.cond type error, no silent promotion, one program.
  params = accumjax.cast_floats(reference.init_params(), jnp.bfloat16)
  grads = _grads(6, params)
  tx = accumjax.LazyMultiSteps(optax.adamw(1e-2, mu_dtype=jnp.bfloat16), 3)
  update = jax.jit(tx.update)
  state = tx.init(params)
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  ref = _run(lambda **k: optax.MultiSteps(optax.adamw(1e-2, mu_dtype=jnp.bfloat16), **k),
             grads, params, every_k_schedule=3)
  for g, (_, ref_state, _) in zip(grads, ref, strict=True):
    _, state = update(g, state, params)
    assert jax.tree.map(lambda x: x.dtype, state) == dtypes
    chex.assert_trees_all_equal_dtypes(state, ref_state)
  assert update._cache_size() == 1


@pytest.mark.parametrize('mode', ['multisteps', 'hybrid'])
@pytest.mark.parametrize('hint', [True, False], ids=['driver_counts', 'read_from_the_cycle'])
def test_bf16_params_in_the_train_step(mode, hint):
  config = config_for(mode, 4)
  params = accumjax.cast_floats(reference.init_params(), jnp.bfloat16)
  tx = accumjax.accumulating_optimizer(optax.adamw(1e-2), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config))
  state = accumjax.init_train_state(params, tx, 0)
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  run_step = step if hint else (lambda s, b, last_call: step(s, b))  # None: from the cycle
  for batch in reference.make_batches(2, ROWS):
    state = loop.run_update(run_step, state, calls_of(batch, config), config).state
    assert jax.tree.map(lambda x: x.dtype, state) == dtypes
  assert int(state.update_step) == 2
  assert step._cache_size() == 2  # the interim program and the completing one
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True))


@pytest.mark.parametrize('kwargs,match', [
    (dict(every_k_schedule=0), 'every_k_schedule=0; allowed: an int >= 1'),
    (dict(every_k_schedule=-2), 'every_k_schedule=-2'),
    (dict(every_k_schedule=2.0), 'every_k_schedule=2.0'),
    (dict(every_k_schedule='4'), "every_k_schedule='4'"),
    (dict(every_k_schedule=True), 'every_k_schedule=True'),
    (dict(every_k_schedule=2, use_grad_mean='yes'), "use_grad_mean='yes'"),
    (dict(every_k_schedule=2, should_skip_update_fn='skip'), 'is not callable'),
    (dict(every_k_schedule=2, accumulator_dtype=jnp.int32), 'accumulator_dtype'),
])
def test_bad_settings_are_config_errors(kwargs, match):
  with pytest.raises(accumjax.ConfigError, match=match):
    accumjax.LazyMultiSteps(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize('path', ['lazy_multisteps', 'train_step_cycle'])
def test_the_emitting_call_resets_the_accumulator_to_exact_positive_zeros(path):
  """By design (docs/api.md): where optax computes `0 * acc` (NaN stays NaN, a negative sum
  gives -0.0), the cycle's last call leaves exact +0.0, whatever the sums held: in
  LazyMultiSteps, and in the train step's own cycle."""
  params = {'w': jnp.ones((4,))}
  tx = accumjax.LazyMultiSteps(optax.sgd(0.1), every_k_schedule=2, use_grad_mean=False)
  state = tx.init(params)
  first = {'w': jnp.array([-1.0, jnp.nan, jnp.inf, 2.0])}
  _, state = jax.jit(tx.update)(first, state, params)
  np.testing.assert_array_equal(np.isnan(state.acc_grads['w']), [False, True, False, False])
  if path == 'lazy_multisteps':
    _, state = jax.jit(tx.update)({'w': jnp.full((4,), -3.0)}, state, params)
    assert int(state.mini_step) == 0
    acc = np.asarray(state.acc_grads['w'])
  else:  # the train step's completing program (here a flush) on a cycle holding those sums
    config = accumjax.AccumConfig(num_microbatches=2, microbatch_size=1, mode='multisteps')
    ts = accumjax.init_train_state(params, optax.sgd(0.1), 0, config)
    sums = ts.cycle.sums._replace(grads={'w': first['w'] - 3.0}, weight=jnp.float32(1))
    ts = ts._replace(cycle=ts.cycle._replace(sums=sums, microbatches=jnp.ones((), jnp.int32)))
    ts, m = jax.jit(accumjax.make_flush(optax.sgd(0.1), config))(ts)
    assert bool(m['updated']) and int(ts.cycle.microbatches) == 0
    acc = np.asarray(ts.cycle.sums.grads['w'])
  np.testing.assert_array_equal(acc, np.zeros(4))
  assert not np.signbit(acc).any()
