"""Optimizers that consume `GradSums` and divide once, inside the optimizer chain.

`accumulating_optimizer(inner, config)` turns any optax optimizer into one whose "gradient"
input is a `GradSums(grads=sum of d loss_sum/d params, loss_sum, weight)`:

- `normalized(inner, policy)` divides the gradient sum by the weight sum, then runs `inner`.
  An update whose total weight is zero is skipped: zero updates, and the inner state (schedule
  count, moments) is left exactly as it was, so params can never become NaN from 0/0. This is
  also where the non-finite policy is decided, once per update: the core has already left the
  bad micro-batches out of the sums and counted them (`sums.nonfinite`); under 'skip_update'
  and 'raise' any count > 0 skips the update the same way, under 'skip_microbatch' the rest
  is applied (the division by the remaining weight renormalises it).
- For `multisteps` and `hybrid` the result is wrapped in `optax.MultiSteps(...,
  use_grad_mean=False)`. MultiSteps then *sums* the GradSums of its calls (gradient sums,
  loss sums and weights alike), so the normalisation sees the cycle's totals: the update is
  the gradient of total loss_sum / total weight however the tokens were spread across calls.
  (MultiSteps' default running mean would weigh every call equally instead.) It sums the
  non-finite counts too, and since the core never lets a NaN into the sums, MultiSteps' reset
  of its accumulator (`(1 - emit) * acc`, where 0 * NaN would stay NaN) always clears it.
"""

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


def _updates(grads, like: GradSums) -> GradSums:
  zero = jnp.zeros_like
  return GradSums(grads, zero(like.loss_sum), zero(like.weight), zero(like.nonfinite))


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
    return _updates(updates, sums), new_state

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
            last_call: bool | None = None):
    """(new params, new state) for one call's sums.

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
              jax.tree.map(jnp.zeros_like, acc))

    def hold(operand):
      acc, inner_state, params = operand
      return params, inner_state, acc

    operand = (acc, state.inner_opt_state, params)
    if last_call is None:
      params, inner_state, acc = jax.lax.cond(emit, fire, hold, operand)
    else:
      params, inner_state, acc = (fire if last_call else hold)(operand)
    return params, optax.MultiStepsState(
        mini_step=(state.mini_step + 1) % self.k,
        gradient_step=state.gradient_step + emit.astype(state.gradient_step.dtype),
        inner_opt_state=inner_state, acc_grads=acc, skip_state=state.skip_state)

  def update(self, updates, state, params=None, **extra_args):
    """The optax interface, for callers that apply updates themselves."""
    del extra_args
    new_params, new_state = self.apply(updates, state, params.grads)
    deltas = jax.tree.map(jnp.subtract, new_params, params.grads)
    return _updates(deltas, updates), new_state


def apply_sums(tx, sums: GradSums, opt_state, params, last_call: bool | None = None):
  """One call's sums into the optimizer: (new params, new optimizer state).

  `last_call` is a static hint used by LazyMultiSteps (see there); others ignore it.
  """
  if isinstance(tx, LazyMultiSteps):
    return tx.apply(sums, opt_state, params, last_call)
  updates, opt_state = tx.update(sums, opt_state, as_opt_params(params))
  return optax.apply_updates(params, updates.grads), opt_state


def pending_sums(opt_state) -> GradSums | None:
  """The sums accumulated so far in the current cycle (None for scan-mode optimizers)."""
  if isinstance(opt_state, optax.MultiStepsState):
    return opt_state.acc_grads
  return None


def flush_multisteps(tx, opt_state, params):
  """Applies a partial cycle's sums as one update (no-op if nothing is pending).

  Returns (updates for params, new MultiSteps state at the start of a fresh cycle).
  """
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
  updates = jax.tree.map(lambda u: jnp.where(pending, u, jnp.zeros_like(u)), updates.grads)
  return updates, new_state
