"""jit_donating: the state leaves a call changes are donated and returned; the ones it only
reads are passed in; the ones it neither reads nor changes are not passed at all. Results are
those of a plain jit, whatever the function does with its state."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accumjax
from accumjax import donation


def _state():
  return {'params': {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)},
          'acc': {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)},
          'moments': jnp.full((4,), 2.0, jnp.float32), 'step': jnp.zeros((), jnp.int32)}


def interim(state, g, *, last_call=None):
  """Adds g into acc, reads params for a metric, leaves moments untouched; on the last call
  resets acc with zeros_like (reads acc's shape only) and moves the moments."""
  acc = jax.tree.map(jnp.add, state['acc'], g)
  metric = jnp.sum(state['params']['w'])
  new = dict(state, acc=acc, step=state['step'] + 1)
  if last_call:
    new['moments'] = state['moments'] * 0.5 + jnp.sum(acc['w'])
    new['acc'] = jax.tree.map(jnp.zeros_like, acc)
  return new, metric


def test_plan_sorts_leaves_and_results_match_a_plain_jit():
  g = {'w': jnp.ones((2, 3)), 'b': jnp.full((3,), 2.0)}
  jd = donation.jit_donating(interim)
  plain = jax.jit(interim, static_argnames=('last_call',))
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(_state())[0]]
  plan = jd.plan(_state(), g, last_call=False)
  assert {names[i] for i in plan.changed} == {"['acc']['b']", "['acc']['w']", "['step']"}
  assert {names[i] for i in plan.read} == {"['params']['w']"}
  assert {names[i] for i in plan.unread} == {"['moments']", "['params']['b']"}
  plan = jd.plan(_state(), g, last_call=True)
  assert "['moments']" in {names[i] for i in plan.changed}

  state, ref = _state(), _state()
  for last in (False, False, True, False, True):
    moments, params_b = state['moments'], state['params']['b']
    state, metric = jd(state, g, last_call=last)
    ref, ref_metric = plain(ref, g, last_call=last)
    chex.assert_trees_all_equal(state, ref)
    chex.assert_trees_all_equal(metric, ref_metric)
    if not last:  # untouched leaves are the caller's very arrays, not copies
      assert state['moments'] is moments and state['params']['b'] is params_b
  assert jd._cache_size() == 2  # one program per value of last_call


def test_changed_leaves_are_donated_and_the_rest_stay_alive():
  g = {'w': jnp.ones((2, 3)), 'b': jnp.ones(3)}
  jd = donation.jit_donating(interim)
  state = _state()
  acc_w, params_w, moments = state['acc']['w'], state['params']['w'], state['moments']
  jd(state, g, last_call=False)
  assert acc_w.is_deleted()  # updated in place
  assert not params_w.is_deleted() and not moments.is_deleted()


def test_a_dtype_change_is_followed():
  def widen(state, x):
    return {'a': (state['a'] + x).astype(jnp.float32), 'b': state['b']}, None

  jd = donation.jit_donating(widen)
  state = {'a': jnp.ones(3, jnp.bfloat16), 'b': jnp.ones(2)}
  state, _ = jd(state, jnp.ones(3, jnp.bfloat16))
  assert state['a'].dtype == jnp.float32
  state, _ = jd(state, jnp.ones(3, jnp.bfloat16))  # a new signature: a new plan, no error
  np.testing.assert_array_equal(state['a'], np.full(3, 3.0))
  assert jd._cache_size() == 2


def test_the_train_step_interim_program_takes_no_optimizer_state():
  """The point of it all: an interim LazyMultiSteps call neither takes nor returns the inner
  optimizer state, and reads the params (the forward pass) without donating them."""
  import optax

  from tests.helpers import lm_loss
  from tests.reference import init_params, make_batches
  params = init_params()
  batch = make_batches(1, 2)[0]
  config = accumjax.AccumConfig(num_microbatches=2, microbatch_size=2,
                                mode='multisteps')
  tx = accumjax.accumulating_optimizer(optax.adamw(1e-2), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config))
  state = accumjax.init_train_state(params, tx, 0)
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  names = [jax.tree_util.keystr(p) for p, _ in leaves]
  plan = step.plan(state, batch, last_call=False)
  changed, read, unread = ({names[i] for i in part} for part in (plan.changed, plan.read,
                                                                  plan.unread))
  assert any('.mu' in n for n in unread) and any('.nu' in n for n in unread), unread
  assert not any('inner_opt_state' in n for n in changed)
  # read, not donated: the params (the forward pass), the rng, the loss scale, and Adam's
  # count (the schedule_count metric), nothing else
  assert {n for n in read if not n.startswith('.params')} == {
      '.opt_state.inner_opt_state[0].count', '.rng', '.loss_scale'}, read
  assert not any(n.startswith('.params') for n in changed)
  assert any('acc_grads' in n for n in changed)
  # and the emitting program changes the params and the moments
  plan = step.plan(state, batch, last_call=True)
  changed = {names[i] for i in plan.changed}
  assert any(n.startswith('.params') for n in changed)
  assert any('inner_opt_state' in n for n in changed)


def test_a_plan_that_depends_on_the_other_arguments_is_followed():
  """jit_donating leaves the other arguments' shapes and structure to jit's cache; a function
  whose plan depends on them (here: it reads `b` only for a 2-D `x`, and changes `b` for a
  tuple) must still match a plain jit and pass the untouched leaves through."""
  def f(state, x):
    if isinstance(x, tuple):
      return {'a': state['a'] + x[0], 'b': state['b'] * 2.0}, None
    if x.ndim == 2:
      return {'a': state['a'] + x.sum(0) + state['b'].sum(), 'b': state['b']}, None
    return {'a': state['a'] + x, 'b': state['b']}, None

  jd = donation.jit_donating(f)
  plain = jax.jit(f)
  state, ref = {'a': jnp.ones(3), 'b': jnp.ones(2)}, {'a': jnp.ones(3), 'b': jnp.ones(2)}
  assert jd.plan(state, jnp.ones(3)).unread == (1,)
  for x in (jnp.ones(3), jnp.ones((2, 3)), jnp.ones(3), (jnp.ones(3),), jnp.ones((4, 3))):
    b = state['b']
    state, _ = jd(state, x)
    ref, _ = plain(ref, x)
    chex.assert_trees_all_equal(state, ref)
    if not isinstance(x, tuple):
      assert state['b'] is b  # never donated nor copied when the call does not change it
  assert jd._key_on_arg_avals  # the 2-D call's retrace found another plan, and said so
  assert jd.plan(state, jnp.ones((2, 3))).read == (1,)
  assert jd.plan(state, (jnp.ones(3),)).changed == (0, 1)


def test_a_state_rebuilt_from_the_returned_one_is_checked_part_by_part():
  """A call on the very state the last call returned walks only what it passes or changes.
  Anything else the caller did to that state must still be seen: arrays replaced where the
  call reads or changes them (in place or in a new container), new unread subtrees, new
  shapes."""
  g = {'w': jnp.ones((2, 3)), 'b': jnp.full((3,), 2.0)}
  jd = donation.jit_donating(interim)
  plain = jax.jit(interim, static_argnames=('last_call',))
  state, ref = _state(), _state()

  def both(state, ref, last=False, walked=True):
    # walked: the state is checked against the last returned one, not flattened whole
    assert (jd._from_last(state, (g,), {'last_call': last}) is not None) == walked
    state, metric = jd(state, g, last_call=last)
    ref, ref_metric = plain(ref, g, last_call=last)
    chex.assert_trees_all_equal(state, ref)
    chex.assert_trees_all_equal(metric, ref_metric)
    return state, ref

  state, ref = both(state, ref, walked=False)
  state, ref = both(state, ref)
  # a read leaf replaced in place: the metric must see it
  state['params']['w'] = jnp.full((2, 3), 7.0, jnp.float32)
  ref['params']['w'] = jnp.full((2, 3), 7.0, jnp.float32)
  state, ref = both(state, ref)
  # a changed leaf replaced in a new container
  state = dict(state, acc={'w': jnp.full((2, 3), 3.0, jnp.float32), 'b': state['acc']['b']})
  ref = dict(ref, acc={'w': jnp.full((2, 3), 3.0, jnp.float32), 'b': ref['acc']['b']})
  state, ref = both(state, ref)
  # a read leaf with another dtype (a new signature)
  state['params']['w'] = state['params']['w'].astype(jnp.bfloat16)
  ref['params']['w'] = ref['params']['w'].astype(jnp.bfloat16)
  state, ref = both(state, ref, walked=False)
  state, ref = both(state, ref)
  # an unread subtree replaced, same shape, then with another shape (a new signature)
  state, ref = dict(state, moments=jnp.ones(4)), dict(ref, moments=jnp.ones(4))
  state, ref = both(state, ref, walked=False)
  state, ref = dict(state, moments=jnp.ones(5)), dict(ref, moments=jnp.ones(5))
  state, ref = both(state, ref, last=True, walked=False)
  assert state['moments'].shape == (5,)
  # no array where the last state had one: refused as a plain jit refuses it (None + 1)
  state, ref = dict(state, step=None), dict(ref, step=None)
  with pytest.raises(TypeError):
    plain(ref, g, last_call=False)
  with pytest.raises(TypeError):
    jd(state, g, last_call=False)


def test_an_in_place_change_is_seen_across_a_switch_of_plan():
  """The state a call returned, changed in place, then passed to a call of the other plan
  (interim -> emitting): it is checked against the signature, not trusted by identity."""
  g = {'w': jnp.ones((2, 3)), 'b': jnp.full((3,), 2.0)}
  jd = donation.jit_donating(interim)
  plain = jax.jit(interim, static_argnames=('last_call',))
  state, ref = _state(), _state()
  for last in (False, True, False):  # both plans exist for this signature
    state, _ = jd(state, g, last_call=last)
    ref, _ = plain(ref, g, last_call=last)
  assert jd._from_last(state, (g,), {'last_call': True}) is not None
  state['acc']['w'] = state['acc']['w'].astype(jnp.bfloat16)
  ref['acc']['w'] = ref['acc']['w'].astype(jnp.bfloat16)
  assert jd._from_last(state, (g,), {'last_call': True}) is None
  state, metric = jd(state, g, last_call=True)
  ref, ref_metric = plain(ref, g, last_call=True)
  chex.assert_trees_all_equal(state, ref)
  chex.assert_trees_all_equal_dtypes(state, ref)
