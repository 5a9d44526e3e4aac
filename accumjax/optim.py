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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from accumjax.config import AccumConfig
from accumjax.core import GradSums, normalize


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
  return GradSums(grads, zero(like.loss_sum), flag, zero(like.nonfinite))


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
    mean_grads, _ = normalize(sums)
    updates, new_state = inner.update(
        mean_grads, state, None if params is None else params.grads)
    keep = applies(sums, policy)
    updates = jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), updates)
    new_state = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_state, state)
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
  """optax.MultiSteps with its state and results, minus its per-call optimizer cost.

  optax.MultiSteps runs the wrapped optimizer on every call and keeps the result only on the
  last call of a cycle (`jnp.where` over the whole optimizer state, then a masked update that
  still rewrites every parameter). Here `apply` adds the call's sums into the accumulator and
  runs the wrapped optimizer, and the parameter update, inside a `lax.cond` that only the
  cycle's last call takes: an interim call costs one add. The state is an
  `optax.MultiStepsState` holding the same values as optax's (checkpoints are interchangeable);
  with the `last_call` hint of a training loop that counts its calls there is no branch at all.
  results agree to float32 rounding (tests/test_perf_paths.py; the two XLA programs fuse
  differently, so the last bit can differ). Constant K, sums only.
  """

  def __init__(self, opt, every_k_schedule: int, use_grad_mean=False, accumulator_dtype=None):
    if not isinstance(every_k_schedule, int) or use_grad_mean:
      raise ValueError('LazyMultiSteps takes a constant int K and sums (use_grad_mean=False).')
    super().__init__(opt, every_k_schedule, use_grad_mean=False,
                     accumulator_dtype=accumulator_dtype or jnp.float32)
    self.k = every_k_schedule

  def apply(self, sums: GradSums, state: optax.MultiStepsState, params,
            last_call: bool | None = None) -> Applied:
    """One call's sums into the optimizer: the new params and state, and what happened.

    `last_call` (static) says whether this call completes the cycle, when the caller knows
    (a training loop counts its calls): then there is no branch at all, and an interim call's
    program only adds into the accumulator (params and optimizer state pass through, aliased
    when donated). None decides on device with `lax.cond`, which is correct without the hint
    but makes XLA copy the operands (slower than optax.MultiSteps on CPU; see RESULTS.md).
    A wrong hint would break the cycle: only pass what you counted.
    """
    acc = jax.tree.map(lambda g, a: (g + a).astype(a.dtype), sums, state.acc_grads)
    emit = state.mini_step == self.k - 1
    if last_call is not None:
      emit = jnp.asarray(last_call)

    def fire(operand):
      acc, inner_state, params = operand
      updates, inner_state = self.inner_opt.update(acc, inner_state, as_opt_params(params))
      return (optax.apply_updates(params, updates.grads), inner_state,
              jax.tree.map(jnp.zeros_like, acc), updates.weight > 0)

    def hold(operand):
      acc, inner_state, params = operand
      return params, inner_state, acc, jnp.zeros((), bool)

    operand = (acc, state.inner_opt_state, params)
    if last_call is None:
      params, inner_state, new_acc, applied = jax.lax.cond(emit, fire, hold, operand)
    else:
      params, inner_state, new_acc, applied = (fire if last_call else hold)(operand)
    new_state = optax.MultiStepsState(
        mini_step=(state.mini_step + 1) % self.k,
        gradient_step=state.gradient_step + emit.astype(state.gradient_step.dtype),
        inner_opt_state=inner_state, acc_grads=new_acc, skip_state=state.skip_state)
    return Applied(params, new_state, emit, applied, acc)

  def update(self, updates, state, params=None, **extra_args):
    """The optax interface, for callers that apply updates themselves."""
    del extra_args
    out = self.apply(updates, state, params.grads)
    deltas = jax.tree.map(jnp.subtract, out.params, params.grads)
    return _updates(deltas, updates, out.applied), out.opt_state


def apply_sums(tx, sums: GradSums, opt_state, params, last_call: bool | None = None) -> Applied:
  """One call's sums into the accumulating optimizer `tx`: see `Applied`.

  `last_call` is a static hint used by LazyMultiSteps (see there); others ignore it.
  """
  if isinstance(tx, LazyMultiSteps):
    return tx.apply(sums, opt_state, params, last_call)
  if isinstance(opt_state, optax.MultiStepsState):
    totals = jax.tree.map(lambda a, g: (a + g).astype(a.dtype), opt_state.acc_grads, sums)
  else:
    totals = sums
  updates, opt_state = tx.update(sums, opt_state, as_opt_params(params))
  if isinstance(opt_state, optax.MultiStepsState):
    updated = opt_state.mini_step == 0
  else:
    updated = jnp.ones((), bool)
  return Applied(optax.apply_updates(params, updates.grads), opt_state, updated,
                 updated & (updates.weight > 0), totals)


def flush_multisteps(tx, opt_state, params) -> Applied:
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
  return Applied(optax.apply_updates(params, deltas), new_state, pending,
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
