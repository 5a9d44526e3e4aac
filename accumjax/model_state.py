"""State other than gradients, carried through the micro-batch scan and across calls.

A model can hold state that a forward pass updates besides its parameters: BatchNorm running
averages, step counters, maxima (MoE expert loads, FP8 amax). Under accumulation one update
sees K micro-batches, and each of them proposes a new value. A *rule* per state leaf says how
the K proposals become the update's one new value:

- 'last': threaded. Micro-batch j sees micro-batch j-1's output and the update keeps the last
  one: the same as K small steps (a BatchNorm running average updated K times with micro-batch
  statistics). Equals the big batch only for state that does not depend on the batch.
- 'sum': every micro-batch sees the update's starting value s0 and proposes u_j; the update
  keeps s0 + sum_j (u_j - s0). Equals the big batch for increments that add over examples
  (counters, token or expert-load counts).
- 'max': every micro-batch sees s0; the update keeps max_j u_j. Equals the big batch for any
  max over examples (amax), since max is associative.
- 'mean': every micro-batch sees s0; the update keeps sum_j w_j u_j / sum_j w_j with w_j the
  micro-batch's loss weight (its examples or tokens). Equals the big batch for state that is an
  affine function of a per-example mean, e.g. a BatchNorm running *mean*
  m s0 + (1 - m) mean(x). Not for a running *variance*: the mean of micro-batch variances lacks
  the spread between the micro-batch means (tests/test_model_state.py measures it).

No rule makes the *forward pass* of a micro-batch see big-batch statistics: a BatchNorm layer
in training mode normalizes with its micro-batch's own mean and variance ("ghost batch norm"),
so its gradient is not the big batch's whatever happens to its running averages.
experiments/batchnorm.py measures that and the remedies.

Micro-batches left out as non-finite propose nothing. The new value is committed when the
update is applied; on a skipped update the state keeps its value from the cycle's start, like
the params. With several devices each device sums its own micro-batches and the accumulators
meet in one reduction per call ('sum', 'mean': psum; 'max': pmax); 'last' has no big-batch
meaning across devices and is refused there.

The loss function of a model with state takes it as a fourth argument and returns the new
state beside the usual tuple:

    loss_fn(params, microbatch, rng, model_state) -> ((loss_sum, weight[, aux]), new_state)
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from accumjax.errors import ConfigError

RULES = ('last', 'sum', 'max', 'mean')


class StateAcc(NamedTuple):
  """The update's state accumulator so far (a pytree of arrays, checkpointed with the state).

  Attributes:
    values: per leaf: 'last' the latest value; 'sum' the sum of (u_j - s0); 'max' the running
      max; 'mean' the sum of w_j u_j in float32.
    weight: float32, the sum of the counted micro-batches' weights.
    count: float32, how many micro-batches were counted.
  """
  values: Any
  weight: jax.Array
  count: jax.Array


def expand_rules(model_state, rules):
  """`rules` (one rule name, or a pytree of names shaped like `model_state`) as a full tree of
  names; a ConfigError names any unknown rule or mismatch."""
  if isinstance(rules, str):
    rules_tree = jax.tree.map(lambda _: rules, model_state)
  else:
    try:
      rules_tree = jax.tree.map(lambda _, r: r, model_state, rules)
    except (ValueError, TypeError) as e:
      raise ConfigError(
          f'state_rules must be one of {RULES} or a pytree of them shaped like the model '
          f'state; the structures differ: {e}') from None
  for path, r in jax.tree_util.tree_leaves_with_path(rules_tree):
    if r not in RULES:
      raise ConfigError(f'state_rules{jax.tree_util.keystr(path)} = {r!r}; allowed: {RULES}.')
  return rules_tree


def _start(x, rule):
  x = jnp.asarray(x)
  if rule == 'last':
    return jnp.array(x)  # a copy: a train state must not hold one buffer twice (donation)
  if rule == 'max':
    low = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    return jnp.full(x.shape, low, x.dtype)
  if rule == 'mean':
    return jnp.zeros(x.shape, jnp.float32)
  return jnp.zeros_like(x)  # 'sum'


def init_acc(model_state, rules) -> StateAcc:
  """The empty accumulator of an update that starts from `model_state` (new buffers)."""
  rules = expand_rules(model_state, rules)
  return StateAcc(jax.tree.map(_start, model_state, rules), jnp.zeros((), jnp.float32),
                  jnp.zeros((), jnp.float32))


def restart(acc: StateAcc, rules) -> StateAcc:
  """An empty accumulator that continues `acc`'s 'last' values (a call's, or a device's, own
  accumulator, to be `merge`d into the cycle's): the empty one of its values, since an empty
  accumulator keeps only the 'last' leaves of what it starts from."""
  return init_acc(acc.values, rules)


def view(start, acc: StateAcc, rules):
  """The state a micro-batch sees: 'last' leaves the latest value, the others the start."""
  rules = expand_rules(start, rules)
  return jax.tree.map(lambda s, a, r: a if r == 'last' else s, start, acc.values, rules)


def add(acc: StateAcc, rules, start, proposal, weight, keep) -> StateAcc:
  """`acc` plus one micro-batch's `proposal` (counted only where `keep`)."""
  rules = expand_rules(start, rules)
  w = jnp.where(keep, jnp.asarray(weight, jnp.float32), 0.0)

  def one(a, s, u, r):
    u = jnp.asarray(u).astype(jnp.asarray(s).dtype)
    if r == 'last':
      new = u
    elif r == 'sum':
      new = a + (u - s)
    elif r == 'max':
      new = jnp.maximum(a, u)
    else:
      new = a + w * u.astype(jnp.float32)
    return jnp.where(keep, new, a)

  try:
    values = jax.tree.map(one, acc.values, start, proposal, rules)
  except (ValueError, TypeError) as e:
    raise ConfigError(
        'loss_fn returned a new model state whose structure differs from the one it was '
        f'given: {e}') from None
  return StateAcc(values, acc.weight + w, acc.count + keep.astype(jnp.float32))


def merge(a: StateAcc, b: StateAcc, rules) -> StateAcc:
  """Both accumulators together (`b` after `a`: its 'last' values win)."""
  rules = expand_rules(a.values, rules)

  def one(x, y, r):
    if r == 'last':
      return y
    return jnp.maximum(x, y) if r == 'max' else x + y

  return StateAcc(jax.tree.map(one, a.values, b.values, rules), a.weight + b.weight,
                  a.count + b.count)


def reduce_devices(acc: StateAcc, rules, axis_name) -> StateAcc:
  """Inside `shard_map`: the devices' accumulators combined (psum; pmax for 'max')."""
  rules = expand_rules(acc.values, rules)
  if 'last' in jax.tree.leaves(rules):
    raise ConfigError("state rule 'last' has no big-batch meaning across devices (each device "
                      "has its own last micro-batch); use 'sum', 'max' or 'mean' with "
                      'num_devices > 1.')
  values = jax.tree.map(
      lambda x, r: jax.lax.pmax(x, axis_name) if r == 'max' else jax.lax.psum(x, axis_name),
      acc.values, rules)
  weight, count = jax.lax.psum((acc.weight, acc.count), axis_name)
  return StateAcc(values, weight, count)


def finalize(start, acc: StateAcc, rules):
  """The update's new state from its start and accumulator (the start where nothing was
  counted)."""
  rules = expand_rules(start, rules)
  counted = acc.count > 0
  safe_w = jnp.where(acc.weight > 0, acc.weight, 1.0)

  def one(s, a, r):
    s = jnp.asarray(s)
    if r == 'last':
      return a
    if r == 'sum':
      return s + a
    if r == 'max':
      return jnp.where(counted, a, s)
    return jnp.where(acc.weight > 0, a / safe_w, s.astype(jnp.float32)).astype(s.dtype)

  return jax.tree.map(one, start, acc.values, rules)
