"""Optimizers that consume `GradSums` and divide once, inside the optimizer chain.

`accumulating_optimizer(inner, config)` turns any optax optimizer into one whose "gradient"
input is a `GradSums(grads=sum of d loss_sum/d params, loss_sum, weight)`:

- `normalized(inner, policy)` divides the gradient sum by the weight sum, then runs `inner`.
  An update whose total weight is zero is skipped: zero updates, and the inner state (schedule
  count, moments) is left exactly as it was, so params can never become NaN from 0/0. This is
  also where the non-finite policy is decided, once per update (`applies`): the core has
  already left the bad micro-batches out of the sums and counted them (`sums.nonfinite`);
  under 'skip_update' and 'raise' any count > 0 skips the update the same way, under
  'skip_microbatch' the rest is applied (the division by the remaining weight renormalises
  it). The decision travels out in the `weight` field of the updates (1.0: applied), so
  nothing downstream decides it again.
- `apply_sums` is the one entry point of the train step: one call's sums in, and out the new
  params and state plus an `Applied` record: whether this call completed an update, whether
  that update was applied, and the cycle's totals. Nothing else re-derives these.
- For `multisteps` and `hybrid` the result is wrapped in `optax.MultiSteps(...,
  use_grad_mean=False)`. MultiSteps then *sums* the GradSums of its calls (gradient sums,
  loss sums and weights alike), so the normalisation sees the cycle's totals: the update is
  the gradient of total loss_sum / total weight however the tokens were spread across calls.
  (MultiSteps' default running mean would weigh every call equally instead.) It sums the
  non-finite counts too, and since the core never lets a NaN into the sums, MultiSteps' reset
  of its accumulator (`(1 - emit) * acc`, where 0 * NaN would stay NaN) always clears it.
"""

import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from accumjax.config import AccumConfig
from accumjax.core import ConfigError, GradSums, normalize


def as_opt_params(params) -> GradSums:
  """The params in the structure the accumulating optimizers expect."""
  zero = lambda: jnp.zeros((), jnp.float32)
  return GradSums(params, zero(), zero(), zero())


def applies(sums: GradSums, policy: str = 'skip_update') -> jax.Array:
  """Whether an update with these (whole-cycle) sums is applied: weight left, and no
  non-finite micro-batch unless the policy is 'skip_microbatch'."""
  keep = sums.weight > 0
  if policy != 'skip_microbatch':
    keep &= sums.nonfinite == 0
  return keep


def _updates(grads, like: GradSums, applied=None) -> GradSums:
  """Updates in the GradSums structure; `weight` says whether they were applied (1.0 or 0.0)."""
  zero = jnp.zeros_like
  flag = zero(like.weight) if applied is None else applied.astype(like.weight.dtype)
  return GradSums(grads, zero(like.loss_sum), flag, zero(like.nonfinite),
                  jax.tree.map(zero, like.noise))


class Applied(NamedTuple):
  """What one call did to the optimizer, decided once (by `normalized` and the cycle count).

  Attributes:
    params: the new params.
    opt_state: the new optimizer state.
    updated: bool scalar, this call completed an update (always true in scan mode).
    applied: bool scalar, that update was applied (false: skipped, params and inner state
      unchanged; always false on calls that complete no update).
    totals: the cycle's sums including this call (the whole update's when `updated`).
  """
  params: Any
  opt_state: Any
  updated: jax.Array
  applied: jax.Array
  totals: GradSums


def normalized(inner: optax.GradientTransformation,
               policy: str = 'skip_update') -> optax.GradientTransformation:
  """Runs `inner` on sums.grads / sums.weight; skips updates that `applies` refuses.

  A skipped update gives zero updates and leaves the inner state exactly as it was.
  """

  def init_fn(params: GradSums):
    return inner.init(params.grads)

  def update_fn(sums: GradSums, state, params: GradSums | None = None):
    keep = applies(sums, policy)

    def run(state):
      return inner.update(normalize(sums)[0], state, None if params is None else params.grads)

    shapes = jax.eval_shape(run, state)

    def hold(state):  # zero updates, the state as it was (in the dtypes `run` returns)
      return (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0]),
              jax.tree.map(lambda s, x: x.astype(s.dtype), shapes[1], state))

    # A cond, not `where(keep, new, old)` over the state: with the state donated, the select
    # reads the old buffers after the new ones are written, and XLA copies every one of them
    # (313 copies at 3.3M params, where the step cost 6.9x a plain AdamW step; now 1.6x).
    updates, new_state = jax.lax.cond(keep, run, hold, state)
    return _updates(updates, sums, keep), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def accumulating_optimizer(inner: optax.GradientTransformation, config: AccumConfig):
  """`inner` (plus clipping after accumulation, if configured) fed with GradSums.

  Returns an object with optax's `init(params_as_gradsums)` / `update(sums, state,
  params_as_gradsums)`; in multisteps/hybrid modes it is an `optax.MultiSteps`.
  """
  if config.clip_norm is not None and not config.clip_before_accumulation:
    inner = optax.chain(optax.clip_by_global_norm(config.clip_norm), inner)
  tx = normalized(inner, config.nonfinite)
  if config.calls_per_update == 1:
    return tx
  wrapper = LazyMultiSteps if config.multisteps_impl == 'lazy' else optax.MultiSteps
  return wrapper(tx, every_k_schedule=config.calls_per_update, use_grad_mean=False,
                 accumulator_dtype=config.accum_jnp_dtype)


class LazyMultiSteps(optax.MultiSteps):
  """`optax.MultiSteps` with its state, results and interface, minus its per-call optimizer cost.

  optax.MultiSteps runs the wrapped optimizer on every call and keeps the result only on the
  last call of a cycle (`jnp.where` over the whole optimizer state, then a masked update). Here
  each call adds into the accumulator, and the wrapped optimizer runs inside a `lax.cond` that
  only the cycle's last call takes: an interim call costs the add. Everything optax.MultiSteps
  takes is taken with the same meaning (plain pytrees, `params=None`, `use_grad_mean` True or
  False, an int or a callable `every_k_schedule`, `should_skip_update_fn`, `accumulator_dtype`,
  extra args), the state is an `optax.MultiStepsState` with the same values and dtypes (so
  checkpoints are interchangeable), and `has_updated`, `gradient_transformation()`,
  `inner_opt` work as in optax; optax's own MultiSteps tests pass against it
  (tests/test_optax_multisteps.py).

  Differences, by design: results agree with optax's to float32 rounding, not bitwise (other
  XLA programs); the emitting call resets the accumulator to exact zeros where optax computes
  `0 * acc` (so a NaN accumulator is cleared instead of kept); bad settings (K < 1, a float K)
  raise `ConfigError` where optax silently never updates or fails deep inside.

  accumjax's train step uses it through `apply` (sums of `GradSums`, a static `last_call`
  hint, the params updated inside the branch).
  """

  def __init__(self, opt, every_k_schedule, use_grad_mean: bool = True,
               should_skip_update_fn=None, accumulator_dtype=jnp.float32):
    if not callable(every_k_schedule):
      try:
        k = operator.index(every_k_schedule)  # int and numpy integers, not floats or bools
      except TypeError:
        k = None
      if k is None or isinstance(every_k_schedule, bool) or k < 1:
        raise ConfigError(f'every_k_schedule={every_k_schedule!r}; allowed: an int >= 1, or a '
                          'callable gradient_step -> K.')
      every_k_schedule = int(k)
    if not isinstance(use_grad_mean, bool):
      raise ConfigError(f'use_grad_mean={use_grad_mean!r}; allowed: True, False.')
    if should_skip_update_fn is not None and not callable(should_skip_update_fn):
      raise ConfigError(f'should_skip_update_fn={should_skip_update_fn!r} is not callable.')
    if accumulator_dtype is not None and not jnp.issubdtype(jnp.dtype(accumulator_dtype),
                                                            jnp.floating):
      raise ConfigError(f'accumulator_dtype={accumulator_dtype!r}; allowed: a float dtype.')
    super().__init__(opt, every_k_schedule, use_grad_mean, should_skip_update_fn,
                     accumulator_dtype)
    self._has_skip_fn = should_skip_update_fn is not None

  def _cycle(self, updates, state, params, extra_args, last_call, finish, hold):
    """The lazy core: adds `updates` into the accumulator; on the cycle's last call runs the
    inner optimizer on the accumulated gradients and returns `finish(inner updates)`, on
    other calls `hold()`. Returns (result, new state with the old skip_state, emit, the
    cycle's accumulated sums including this call)."""
    k_steps = self._every_k_schedule(state.gradient_step)
    acc = jax.tree.map(lambda g, a: self._acc_update(g, a, n_acc=state.mini_step),
                       updates, state.acc_grads)
    acc_dtype = self._accumulator_dtype
    emit = state.mini_step == k_steps - 1
    if last_call is not None:
      emit = jnp.asarray(last_call)

    def fire(acc, inner_state):
      inner_updates, new_inner = self._opt.update(
          optax.tree.cast_like(acc, updates), inner_state, params=params, **extra_args)
      new_inner = jax.tree.map(lambda n, o: jnp.asarray(n).astype(o.dtype), new_inner,
                               inner_state)
      zeros = jax.tree.map(lambda a: _zeros_from(a).astype(acc_dtype or a.dtype), acc)
      return finish(inner_updates), new_inner, zeros

    def keep(acc, inner_state):
      return hold(), inner_state, jax.tree.map(lambda a: a.astype(acc_dtype or a.dtype), acc)

    if last_call is None:
      result, inner_state, new_acc = jax.lax.cond(emit, fire, keep, acc, state.inner_opt_state)
    else:
      result, inner_state, new_acc = (fire if last_call else keep)(acc, state.inner_opt_state)
    # Hinted, the cycle ends where the caller says (K may change from cycle to cycle: the
    # driver counts each one); unhinted, every k_steps calls.
    mini_step = optax.safe_increment(state.mini_step) % k_steps if last_call is None else \
        jnp.where(emit, jnp.zeros_like(state.mini_step), optax.safe_increment(state.mini_step))
    new_state = optax.MultiStepsState(
        mini_step=mini_step,
        gradient_step=jnp.where(emit, optax.safe_increment(state.gradient_step),
                                state.gradient_step),
        inner_opt_state=inner_state, acc_grads=new_acc, skip_state=state.skip_state)
    return result, new_state, emit, acc

  def update(self, updates, state, params=None, **extra_args):
    """optax's interface: (updates, new state); updates are zeros except on the last call."""

    def zero_updates():
      shapes = jax.eval_shape(
          lambda acc, inner: self._opt.update(acc, inner, params=params, **extra_args)[0],
          optax.tree.cast_like(state.acc_grads, updates), state.inner_opt_state)
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def do_update(updates, state, params, skip_state):
      result, new_state, _, _ = self._cycle(updates, state, params, extra_args, None,
                                            lambda u: u, zero_updates)
      return result, new_state._replace(skip_state=skip_state)

    if not self._has_skip_fn:
      return do_update(updates, state, params, state.skip_state)
    should_skip, skip_state = self._should_skip_update_fn(updates, state.gradient_step, params)
    if (should_skip.dtype, should_skip.shape) != (jnp.bool_, ()):
      raise ValueError(
          'The `should_skip_update_fn` function should return a boolean scalar array, but it '
          f'returned an array of dtype {should_skip.dtype} and shape {should_skip.shape}')

    def skip(updates, state, params, skip_state):
      return zero_updates(), state._replace(skip_state=skip_state)

    return jax.lax.cond(should_skip, skip, do_update, updates, state, params, skip_state)

  def apply(self, sums: GradSums, state: optax.MultiStepsState, params,
            last_call: bool | None = None, update_scale=None) -> Applied:
    """accumjax's path: one call's `GradSums` into the cycle; the new params and state and
    what happened (`Applied`), the params updated inside the branch.

    `last_call` (static) says whether this call completes the cycle, when the caller knows
    (a training loop counts its calls): then there is no branch at all, and an interim call's
    program only adds into the accumulator (params and optimizer state pass through, aliased
    when donated). None decides on device with `lax.cond`, which is correct without the hint
    but makes XLA copy the operands. A wrong hint would break the cycle: only pass what you
    counted. `update_scale` (a scalar, or None) multiplies the parameter update.
    """
    if self._use_grad_mean or self._has_skip_fn:
      raise ConfigError('apply() sums GradSums: build LazyMultiSteps with use_grad_mean=False '
                        'and no should_skip_update_fn (accumjax decides skips itself).')

    def finish(updates):
      return _apply(params, updates.grads, update_scale), updates.weight > 0

    (new_params, applied), new_state, emit, acc = self._cycle(
        sums, state, as_opt_params(params), {}, last_call, finish,
        lambda: (params, jnp.zeros((), bool)))
    return Applied(new_params, new_state, emit, applied, acc)


def _zeros_from(a):
  """Exact +0.0 in `a`'s shape, computed from `a` (NaN and inf entries too).

  Not `jnp.zeros`: a broadcast constant written over the donated accumulator made XLA copy
  both the accumulator and the broadcast (2 copies per leaf, 108 at 3.3M params; the emitting
  call cost 1.64-1.72x the normalized step, 1.45-1.47x with this). Not `0 * a` as optax: that
  keeps NaN and gives -0.0 for negative sums."""
  z = jnp.abs(a) * 0
  return jnp.where(z == z, z, jnp.zeros_like(z))


def _apply(params, updates, scale=None):
  """params + scale * updates (optax.apply_updates, the updates scaled first when scale is
  given)."""
  if scale is not None:
    updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
  return optax.apply_updates(params, updates)


def apply_sums(tx, sums: GradSums, opt_state, params, last_call: bool | None = None,
               update_scale=None) -> Applied:
  """One call's sums into the accumulating optimizer `tx`: see `Applied`.

  `last_call` is a static hint used by LazyMultiSteps (see there); others ignore it. Noise
  statistics (`sums.noise`) do not enter the optimizer: the train step keeps them.
  `update_scale` (a scalar, or None) multiplies the parameter update (lr batch scaling).
  """
  sums = sums._replace(noise=None)
  if isinstance(tx, LazyMultiSteps):
    return tx.apply(sums, opt_state, params, last_call, update_scale)
  if isinstance(opt_state, optax.MultiStepsState):
    totals = jax.tree.map(lambda a, g: (a + g).astype(a.dtype), opt_state.acc_grads, sums)
  else:
    totals = sums
  updates, opt_state = tx.update(sums, opt_state, as_opt_params(params))
  if isinstance(opt_state, optax.MultiStepsState):
    updated = opt_state.mini_step == 0
  else:
    updated = jnp.ones((), bool)
  return Applied(_apply(params, updates.grads, update_scale), opt_state, updated,
                 updated & (updates.weight > 0), totals)


def flush_multisteps(tx, opt_state, params, update_scale=None) -> Applied:
  """Applies a partial cycle's sums as one update (no-op if nothing is pending); the new
  MultiSteps state starts a fresh cycle."""
  pending = opt_state.mini_step > 0
  updates, inner_state = tx.inner_opt.update(
      opt_state.acc_grads, opt_state.inner_opt_state, params=as_opt_params(params))
  where = lambda new, old: jax.tree.map(lambda n, o: jnp.where(pending, n, o), new, old)
  new_state = optax.MultiStepsState(
      mini_step=jnp.zeros_like(opt_state.mini_step),
      gradient_step=opt_state.gradient_step + pending.astype(opt_state.gradient_step.dtype),
      inner_opt_state=where(inner_state, opt_state.inner_opt_state),
      acc_grads=jax.tree.map(jnp.zeros_like, opt_state.acc_grads),
      skip_state=opt_state.skip_state)
  deltas = jax.tree.map(lambda u: jnp.where(pending, u, jnp.zeros_like(u)), updates.grads)
  return Applied(_apply(params, deltas, update_scale), new_state, pending,
                 pending & (updates.weight > 0), opt_state.acc_grads)


def schedule_count(opt_state) -> jax.Array | None:
  """The inner optimizer's own count of applied updates (optax's schedule step), or None.

  Skipped updates leave it unchanged (see `normalized`), so `schedule(count)` is the
  learning rate the next applied update uses.
  """
  inner = opt_state.inner_opt_state if isinstance(opt_state, optax.MultiStepsState) \
      else opt_state
  found = optax.tree_utils.tree_get_all_with_path(inner, 'count')
  for path, count in found:
    if any(getattr(k, 'tuple_name', None) == 'ScaleByScheduleState' for k in path):
      return count
  return found[0][1] if found else None
