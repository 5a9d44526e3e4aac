"""The faster paths are the same math: the train step's own cycle and LazyMultiSteps equal
optax.MultiSteps.

Not bitwise: the two are different XLA programs, fused differently, so float32 results can
differ in the last bit (measured: ~1 ulp). Counters and structure are exactly equal."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accumjax
from accumjax import optim
from tests import reference
from tests.helpers import run_accumjax
from tests.test_equivalence import ROWS, adamw, config_for


@pytest.mark.parametrize('mode', ['multisteps', 'hybrid'])
@pytest.mark.parametrize('clip', [None, 0.05])
@pytest.mark.parametrize('hint', [True, False], ids=['driver_counts', 'read_from_the_cycle'])
def test_the_own_cycle_equals_optax_multisteps(mode, clip, hint):
  batches = reference.make_batches(3, ROWS)
  runs = {}
  for impl in ('lazy', 'optax'):
    config = config_for(mode, 4, multisteps_impl=impl, clip_norm=clip)
    tx = accumjax.accumulating_optimizer(adamw(), config)
    assert isinstance(tx, optim.optax.MultiSteps) == (impl == 'optax')
    runs[impl] = run_accumjax(reference.init_params(), batches, adamw(), config, hint=hint)
  (lazy, lazy_losses, lazy_calls), (ref, ref_losses, ref_calls) = runs['lazy'], runs['optax']
  _assert_same_state(lazy, ref)
  chex.assert_trees_all_close(lazy_losses, ref_losses, rtol=1e-6)
  for (s1, m1), (s2, m2) in zip(lazy_calls, ref_calls, strict=True):
    _assert_same_state(s1, s2)  # after every call, interim ones included
    _assert_same({k: m1[k] for k in m1}, {k: m2[k] for k in m1})  # the interim call's keys


def _assert_same_state(own, ref):
  """A state with the own cycle against one whose optimizer is optax.MultiSteps: the same
  params, counters and cycle; the same optimizer state inside MultiSteps, and MultiSteps'
  accumulator equal to the cycle's sums."""
  assert isinstance(ref.opt_state, optim.optax.MultiStepsState)
  _assert_same(own._replace(opt_state=None), ref._replace(opt_state=None))
  _assert_same(own.opt_state, ref.opt_state.inner_opt_state)
  _assert_same(own.cycle.sums._replace(noise=None), ref.opt_state.acc_grads)


def _assert_same(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_dtypes(a, b)
  ints = lambda t: [x for x in jax.tree.leaves(t) if not jnp.issubdtype(x.dtype, jnp.floating)]
  chex.assert_trees_all_equal(ints(a), ints(b))
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def test_lazy_multisteps_optax_interface_matches():
  config = config_for('multisteps', 4)
  inner = accumjax.accumulating_optimizer(adamw(), config)
  tx = accumjax.LazyMultiSteps(inner, 4, use_grad_mean=False)
  ref = optim.optax.MultiSteps(inner, 4, use_grad_mean=False)
  params = reference.init_params()
  sums, _ = accumjax.accumulate_sums(
      lambda p, b, r: accumjax.token_cross_entropy(
          reference.logits_fn(p, b['inputs']), b['targets'], b['mask']),
      params, reference.make_batches(1, ROWS)[0], num_microbatches=1)
  s1, s2 = tx.init(optim.as_opt_params(params)), ref.init(optim.as_opt_params(params))
  for _ in range(4):
    u1, s1 = jax.jit(tx.update)(sums, s1, optim.as_opt_params(params))
    u2, s2 = jax.jit(ref.update)(sums, s2, optim.as_opt_params(params))
    chex.assert_trees_all_close(u1.grads, u2.grads, rtol=1e-5, atol=1e-8)
    _assert_same(s1, s2)


def test_accumulation_precision_orders_bf16_compensated_float32():
  from experiments import precision
  rng = np.random.default_rng(0)
  grads = [jnp.asarray(rng.normal(size=4096) * 1e-3, jnp.bfloat16) for _ in range(256)]
  e_bf16, e_comp, e_f32 = precision.errors(grads)
  assert e_f32 < 1e-6 < e_comp < e_bf16
  assert e_bf16 > 5 * e_comp  # what compensation buys at K=256
