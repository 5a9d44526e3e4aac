"""Optimizers that consume `GradSums` and divide once, inside the optimizer chain.

`accumulating_optimizer(optimizer, config)` turns a plain optax optimizer into one whose
"gradient" input is a `GradSums(grads=sum of d loss_sum/d params, loss_sum, weight)`; the
train step calls it itself, so a user passes the plain optimizer:

- `normalized(inner, policy, clip_norm)` divides the gradient sum by the weight sum (and clips
  the mean gradient), then runs `inner`: one scalar multiplied into the sums, fused by XLA into
  `inner`'s own element-wise passes; `Normalized.apply` (the train step's) applies the updates
  in the same pass. An update whose total weight is zero is skipped: zero updates, and the
  inner state (schedule count, moments) is left exactly as it was, so params can never become
  NaN from 0/0. This is
  also where the non-finite policy is decided, once per update (`applies`): the core has
  already left the bad micro-batches out of the sums and counted them (`sums.nonfinite`);
  under 'skip_update' and 'raise' any count > 0 skips the update the same way, under
  'skip_microbatch' the rest is applied (the division by the remaining weight renormalises
  it). The decision travels out in the `weight` field of the updates (1.0: applied), so
  nothing downstream decides it again.
- The train step keeps the sums of an update's calls in its own cycle (`state.Cycle`) and
  runs `normalized` once, on the call that completes the update. Under
  `multisteps_impl='optax'` it wraps `normalized` in `optax.MultiSteps(...,
  use_grad_mean=False)` as shipped instead, which runs the optimizer on every call (the
  reference the own cycle is compared with). MultiSteps then *sums* the GradSums of its calls
  (its default running mean would weigh every call equally instead).
- `LazyMultiSteps` is an `optax.MultiSteps` drop-in for your own optax code: the same state
  and results, but an interim call only adds.
"""

import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from accumjax.config import AccumConfig
from accumjax.core import ConfigError, GradSums
from accumjax.core import _sq_norm as core_sq_norm


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


def scale_of(sums: GradSums, sq_norm: jax.Array | None = None, clip_norm: float | None = None):
  """(factor, grad_norm): the one scalar an update multiplies the gradient sums by, and the
  norm of the mean gradient before clipping (None without `sq_norm`).

  factor = 1 / sums.weight (0 with no weight), times min(1, clip_norm / grad_norm) when
  clipping (optax.clip_by_global_norm's rule, on the mean gradient). A multiplication by one
  scalar, not a division per element: XLA fuses it into every element-wise pass of the
  optimizer that reads the gradient (a division is not duplicated into its consumers, so its
  result is written out and read back)."""
  has_weight = sums.weight > 0
  factor = jnp.where(has_weight, 1.0 / jnp.where(has_weight, sums.weight, 1.0), 0.0)
  if sq_norm is None:
    if clip_norm is not None:
      raise ConfigError('scale_of: clip_norm needs sq_norm (|sums.grads|^2).')
    return factor, None
  grad_norm = jnp.sqrt(sq_norm) * factor
  if clip_norm is not None:
    factor = factor * jnp.where(grad_norm < clip_norm, 1.0, clip_norm / grad_norm)
  return factor, grad_norm


def _cast_like(new_state, state):
  """The state keeps its dtypes (e.g. bf16 moments of bf16 params), so a step compiles once
  and a skipped update (the state as it was) has the applied one's types."""
  return jax.tree.map(lambda n, o: jnp.asarray(n).astype(o.dtype), new_state, state)


class Emitted(NamedTuple):
  """What `Normalized.apply` returns."""
  params: Any
  opt_state: Any
  applied: jax.Array  # bool: whether the update was applied (else params and state as given)
  grad_norm: jax.Array  # norm of the mean gradient before clipping


def normalized(inner: optax.GradientTransformation, policy: str = 'skip_update',
               clip_norm: float | None = None) -> 'Normalized':
  """Runs `inner` on sums.grads / sums.weight (clipped to the global norm `clip_norm` first,
  if given); skips updates that `applies` refuses.

  A skipped update gives zero updates and leaves the inner state exactly as it was. The
  division and the clip are one scalar multiplication of the sums (`scale_of`), fused by XLA
  into the optimizer's own element-wise passes; the skip is a `lax.cond` around them (a
  `where(keep, new, old)` over a donated state makes XLA copy the old buffers). The train
  step calls `Normalized.apply`, which also applies the updates inside that cond.
  """

  def init_fn(params: GradSums):
    return inner.init(params.grads)

  def update_fn(sums: GradSums, state, params: GradSums | None = None, **extra_args):
    del extra_args  # (optax.MultiSteps passes its own; the inner optimizer takes none)
    keep = applies(sums, policy)
    sq_norm = None if clip_norm is None else core_sq_norm(sums.grads)
    factor, _ = scale_of(sums, sq_norm, clip_norm)

    def run(state):
      return inner.update(_scaled(sums.grads, factor), state,
                          None if params is None else params.grads)

    shapes = jax.eval_shape(run, state)

    def hold(state):  # zero updates, the state as it was (in the dtypes `run` returns)
      return (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0]),
              jax.tree.map(lambda s, x: x.astype(s.dtype), shapes[1], state))

    updates, new_state = jax.lax.cond(keep, run, hold, state)
    return _updates(updates, sums, keep), new_state

  def apply(sums: GradSums, state, params, *, sq_norm=None, update_scale=None) -> Emitted:
    """The update applied: (params + update_scale * updates, new state, applied, grad_norm)
    in one fused pass per leaf, inside a `lax.cond` that a skipped update does not take (the
    params and state are then returned as given). `sq_norm`: |sums.grads|^2, if the caller
    has it (one read of the gradient serves the norm metric, the clip and the finiteness
    check: see `core.count_nonfinite_sum`)."""
    if sq_norm is None:
      sq_norm = core_sq_norm(sums.grads)
    keep = applies(sums, policy)
    factor, grad_norm = scale_of(sums, sq_norm, clip_norm)

    def run(params, state):
      updates, new_state = inner.update(_scaled(sums.grads, factor), state, params)
      return apply_updates(params, updates, update_scale), _cast_like(new_state, state)

    params, state = jax.lax.cond(keep, run, lambda params, state: (params, state), params,
                                 state)
    return Emitted(params, state, keep, grad_norm)

  tx = Normalized(init_fn, update_fn)
  tx.apply, tx.clip_norm = apply, clip_norm
  return tx


def _scaled(grads, factor):
  return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)


class Normalized(optax.GradientTransformationExtraArgs):
  """What `normalized` returns: an optax transformation over `GradSums` (so the train step can
  tell it from a plain optimizer, which it wraps itself), with `apply` (the update applied in
  the same pass; see `normalized`). `accum_config` is the `AccumConfig`
  `accumulating_optimizer` built it for (None if none), so `init_train_state` can follow it."""
  accum_config = None
  clip_norm = None


def is_accumulating(tx) -> bool:
  """Whether `tx` already consumes GradSums (built by `accumulating_optimizer`)."""
  return isinstance(tx, Normalized) or (isinstance(tx, optax.MultiSteps)
                                        and isinstance(tx.inner_opt, Normalized))


def accumulating_optimizer(optimizer, config: AccumConfig | None = None):
  """The plain optax `optimizer` fed with GradSums: clipped after accumulation (if `config`
  says so), divided once (`normalized`), and under `multisteps_impl='optax'` with several calls
  per update wrapped in `optax.MultiSteps` as shipped. The train step and `init_train_state`
  call this themselves; an optimizer it returned passes through unchanged (checked against
  `config`).
  """
  if is_accumulating(optimizer):
    built = config_of(optimizer)
    if config is not None and built is not None and _what_it_uses(built) != _what_it_uses(
        config):
      raise ConfigError(
          'the optimizer is an accumulating_optimizer(...) built for another AccumConfig than '
          'this one (its clipping, non-finite policy or optax.MultiSteps wrapping differ: '
          f'{_what_it_uses(built)} vs {_what_it_uses(config)}): pass the plain optax optimizer '
          'and let make_train_step wrap it.')
    return optimizer
  if isinstance(optimizer, optax.MultiSteps):
    raise ConfigError(
        'optimizer is an optax.MultiSteps: pass the plain optimizer (e.g. optax.adamw(...)); '
        'accumjax accumulates across calls itself (multisteps_impl=\'optax\' uses '
        'optax.MultiSteps for you).')
  if not (callable(getattr(optimizer, 'init', None)) and
          callable(getattr(optimizer, 'update', None))):
    raise ConfigError(f'optimizer={optimizer!r}; allowed: an optax GradientTransformation '
                      '(e.g. optax.adamw(1e-3)).')
  clip_after = config is not None and not config.clip_before_accumulation
  tx = normalized(optimizer, 'skip_update' if config is None else config.nonfinite,
                  config.clip_norm if clip_after else None)
  tx.accum_config = config
  if config is None or not _wraps_multisteps(config):
    return tx
  return optax.MultiSteps(tx, every_k_schedule=config.calls_per_update, use_grad_mean=False,
                          accumulator_dtype=config.accum_jnp_dtype)


def config_of(tx) -> AccumConfig | None:
  """The `AccumConfig` an accumulating optimizer was built for, or None."""
  base = tx.inner_opt if isinstance(tx, optax.MultiSteps) else tx
  return getattr(base, 'accum_config', None)


def _what_it_uses(config: AccumConfig) -> dict:
  """What of `config` an accumulating optimizer is built from (not the batch layout)."""
  used = dict(clip_norm=config.clip_norm, clip_before_accumulation=config.clip_before_accumulation,
              nonfinite=config.nonfinite, multisteps=_wraps_multisteps(config))
  if used['multisteps']:
    used.update(calls_per_update=config.calls_per_update, accum_dtype=config.accum_dtype)
  return used


def _wraps_multisteps(config: AccumConfig) -> bool:
  return config.calls_per_update > 1 and config.multisteps_impl == 'optax'


def _refuse_k(k, gradient_step):
  if int(k) < 1:
    raise ConfigError(f'every_k_schedule({int(gradient_step)}) = {int(k)}; a K must be >= 1 '
                      '(optax.MultiSteps would never update).')


def _check_callable_k(k, gradient_step):
  """A callable every_k_schedule's K, checked where it is used: at once when it is a concrete
  value, else on the host when the call runs (the jitted call then raises with this message)."""
  if isinstance(k, jax.core.Tracer) or isinstance(gradient_step, jax.core.Tracer):
    jax.debug.callback(_refuse_k, k, gradient_step)
  else:
    _refuse_k(k, gradient_step)


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
  raise `ConfigError` where optax silently never updates or fails deep inside. A callable
  `every_k_schedule` is checked where its K is used: a K < 1 raises at once when the call is
  not traced, and under `jax.jit` the call raises (with that message) when it runs.

  accumjax's train step does not need it: it keeps an update's sums in its own cycle (see
  `state.Cycle`), which is this lazy add with the cycle's end decided by the call driver.
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
    self._k_is_callable = callable(every_k_schedule)

  def _cycle(self, updates, state, params, extra_args, zero_updates):
    """The lazy core: adds `updates` into the accumulator; on the cycle's last call runs the
    inner optimizer on the accumulated gradients (inside a `lax.cond` that only that call
    takes). Returns (updates, new state with the old skip_state)."""
    k_steps = self._every_k_schedule(state.gradient_step)
    if self._k_is_callable:
      _check_callable_k(k_steps, state.gradient_step)
    acc = jax.tree.map(lambda g, a: self._acc_update(g, a, n_acc=state.mini_step),
                       updates, state.acc_grads)
    acc_dtype = self._accumulator_dtype
    emit = state.mini_step == k_steps - 1

    def fire(acc, inner_state):
      inner_updates, new_inner = self._opt.update(
          optax.tree.cast_like(acc, updates), inner_state, params=params, **extra_args)
      new_inner = jax.tree.map(lambda n, o: jnp.asarray(n).astype(o.dtype), new_inner,
                               inner_state)
      zeros = jax.tree.map(lambda a: zeros_from(a).astype(acc_dtype or a.dtype), acc)
      return inner_updates, new_inner, zeros

    def keep(acc, inner_state):
      return zero_updates(), inner_state, jax.tree.map(
          lambda a: a.astype(acc_dtype or a.dtype), acc)

    result, inner_state, new_acc = jax.lax.cond(emit, fire, keep, acc, state.inner_opt_state)
    new_state = optax.MultiStepsState(
        mini_step=optax.safe_increment(state.mini_step) % k_steps,
        gradient_step=jnp.where(emit, optax.safe_increment(state.gradient_step),
                                state.gradient_step),
        inner_opt_state=inner_state, acc_grads=new_acc, skip_state=state.skip_state)
    return result, new_state

  def update(self, updates, state, params=None, **extra_args):
    """optax's interface: (updates, new state); updates are zeros except on the last call."""

    def zero_updates():
      shapes = jax.eval_shape(
          lambda acc, inner: self._opt.update(acc, inner, params=params, **extra_args)[0],
          optax.tree.cast_like(state.acc_grads, updates), state.inner_opt_state)
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def do_update(updates, state, params, skip_state):
      result, new_state = self._cycle(updates, state, params, extra_args, zero_updates)
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


def zeros_from(a):
  """Exact +0.0 in `a`'s shape, computed from `a` (NaN and inf entries too).

  Not `jnp.zeros`: a broadcast constant written over a donated accumulator makes XLA copy
  both the accumulator and the broadcast (benchmarks/lazy_multisteps.md). Not `0 * a` as
  optax: that keeps NaN and gives -0.0 for negative sums."""
  z = jnp.abs(a) * 0
  return jnp.where(z == z, z, jnp.zeros_like(z))


def apply_updates(params, updates, scale=None):
  """params + scale * updates (optax.apply_updates, the updates scaled first when scale is
  given)."""
  if scale is not None:
    updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
  return optax.apply_updates(params, updates)


def flush_multisteps(tx: optax.MultiSteps, opt_state: optax.MultiStepsState, params, pending):
  """optax.MultiSteps' partial cycle applied as one update (its inner optimizer on what it
  accumulated), a fresh cycle after it. Returns (updates as GradSums, new state); the updates
  are zeros and the state as it was, but for a fresh cycle, unless `pending`."""
  updates, inner_state = tx.inner_opt.update(
      opt_state.acc_grads, opt_state.inner_opt_state, params=as_opt_params(params))
  where = lambda new, old: jax.tree.map(lambda n, o: jnp.where(pending, n, o), new, old)
  new_state = optax.MultiStepsState(
      mini_step=jnp.zeros_like(opt_state.mini_step),
      gradient_step=opt_state.gradient_step + pending.astype(opt_state.gradient_step.dtype),
      inner_opt_state=where(inner_state, opt_state.inner_opt_state),
      acc_grads=jax.tree.map(zeros_from, opt_state.acc_grads),
      skip_state=opt_state.skip_state)
  zero = jax.tree.map(jnp.zeros_like, updates)
  return where(updates, zero), new_state


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
