"""The accumulation core: one `lax.scan` over micro-batches that sums gradients.

Everything in accumjax that accumulates calls `accumulate_sums`: the `scan` mode with all K
micro-batches in one call, `multisteps` with one micro-batch per call, `hybrid` with c. The
core only *sums* (gradient of loss_sum, loss_sum, weight) in float32; it never divides. The
division by the total weight happens once, in `accumulate_gradients` or in the optimizer
wrapper of `accumjax.optim`, after all sums are in.

Non-finite values are caught here, once per micro-batch: a micro-batch whose loss or gradient
holds a NaN or an Inf, or whose weight is negative (a weight is a count of tokens or examples;
a negative one would silently subtract a gradient), adds nothing (its gradient, loss sum and
weight are replaced by zeros with `jnp.where`, so no accumulator ever holds a NaN) and is
counted in `GradSums.nonfinite`.
What to do about it (skip the update, or keep the rest) is decided once per update, in
`optim.normalized`. Under float16 compute the micro-batch's mean loss is multiplied by a loss
scale before differentiation and its gradient unscaled in float32 before it is checked and
added, so the sums never depend on the scale.

Not here: optimizers, training state, data. See `optim.py` and `step.py`.
"""

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from accumjax import model_state as ms
from accumjax.errors import ConfigError, check_bool, check_int

__all__ = ['ConfigError', 'GradSums', 'NoiseSums', 'Scanned', 'accumulate_gradients',
           'accumulate_sums', 'noise_scale', 'normalize', 'scan_microbatches',
           'split_microbatches']

PyTree = Any


class NoiseSums(NamedTuple):
  """What the gradient noise scale needs beyond `GradSums` (see `noise_scale`), summed like it.

  Attributes:
    sq_over_weight: sum over micro-batches j of |S_j|^2 / w_j (S_j: j's gradient sum, w_j > 0
      its weight).
    samples: how many micro-batches that sum holds (those with w_j > 0, finite).
  """
  sq_over_weight: jax.Array
  samples: jax.Array


class GradSums(NamedTuple):
  """Undivided sums over micro-batches (and calls, and devices).

  Attributes:
    grads: sum over micro-batches of d(loss_sum)/d(params), in the accumulation dtype.
    loss_sum: float32 scalar, the sum of loss_sums.
    weight: float32 scalar, the sum of weights (e.g. real tokens).
    nonfinite: float32 scalar, how many micro-batches had a non-finite loss or gradient or a
      negative weight (they contribute zero to the three sums above). A float, so
      optax.MultiSteps sums it like the others.
    noise: `NoiseSums` when noise statistics were asked for, else None (no leaves).
  """
  grads: PyTree
  loss_sum: jax.Array
  weight: jax.Array
  nonfinite: jax.Array
  noise: NoiseSums | None = None


def zero_noise() -> NoiseSums:
  return NoiseSums(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def zero_sums(params, accum_dtype=jnp.float32, noise_stats: bool = False) -> GradSums:
  return GradSums(
      grads=jax.tree.map(lambda p: jnp.zeros(p.shape, accum_dtype), params),
      loss_sum=jnp.zeros((), jnp.float32),
      weight=jnp.zeros((), jnp.float32),
      nonfinite=jnp.zeros((), jnp.float32),
      noise=zero_noise() if noise_stats else None)


def _sq_norm(tree) -> jax.Array:
  """|tree|^2 in float32.

  A leaf of two or more axes is summed along its last axis first, then whole: XLA's CPU
  backend splits that row reduction over the cores, where one reduction to a scalar runs
  on one (benchmarks/emit.md)."""
  def leaf(x):
    sq = jnp.square(x.astype(jnp.float32))
    return jnp.sum(jnp.sum(sq, axis=-1)) if sq.ndim >= 2 else jnp.sum(sq)
  return sum(leaf(x) for x in jax.tree.leaves(tree))


def noise_scale(sums: GradSums, grad_sq_norm: jax.Array | None = None) -> dict:
  """Unbiased |G|^2 and tr(Sigma), and B_simple = tr(Sigma) / |G|^2, from one update's sums.

  The model (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", app. A):
  the loss is a sum over units i (tokens, examples) whose gradients g_i are independent draws
  with mean G and covariance Sigma; G and Sigma are *per unit of weight*. Micro-batch j holds
  w_j units; its gradient sum is S_j = sum_i g_i and its mean m_j = S_j / w_j has
  E|m_j|^2 = |G|^2 + tr(Sigma) / w_j. The update's mean is M = sum_j S_j / W, W = sum_j w_j,
  with E|M|^2 = |G|^2 + tr(Sigma) / W. With n micro-batches of positive weight:

    A = sum_j w_j |m_j|^2 = sum_j |S_j|^2 / w_j      E[A] = W |G|^2 + n tr(Sigma)
    B = W |M|^2                                       E[B] = W |G|^2 +   tr(Sigma)

    trace_sigma = (A - B) / (n - 1)        (unbiased)
    g_sq        = |M|^2 - trace_sigma / W  (unbiased)
    b_simple    = trace_sigma / g_sq       (a ratio of unbiased estimates, in units of weight)

  Unbiased for any positive weights: each micro-batch counts with its own w_j, so padding and
  variable lengths do not bias it (a mean of |m_j|^2 that ignores the weights does: its
  expectation has the mean of 1/w_j where 1/mean(w_j) belongs). With equal weights b this is
  the paper's two-batch-size estimator with B_small = b, B_big = n b. Micro-batches of zero
  weight or left out as non-finite are no samples. With clipping before accumulation the
  statistics are those of the clipped gradients, under float16 of the unscaled ones.

  g_sq is a difference of two noisy terms and can come out <= 0 on one update (b_simple is then
  meaningless); smooth numerator and denominator separately over updates, as the paper does.
  Fewer than 2 samples (K = 1, or all but one micro-batch empty) give NaN for all three: there
  is no small-batch sample to compare with.

  Args:
    sums: the update's sums, with `noise` (see `noise_stats=True`).
    grad_sq_norm: |M|^2, if the caller has it already (else computed from sums.grads).

  Returns: {'g_sq', 'trace_sigma', 'b_simple'} float32 scalars.
  """
  if sums.noise is None:
    raise ConfigError('noise_scale needs sums with noise statistics (noise_stats=True).')
  w, n = sums.weight, sums.noise.samples
  ok = (n >= 2) & (w > 0)
  safe_w = jnp.where(ok, w, 1.0)
  if grad_sq_norm is None:
    grad_sq_norm = _sq_norm(sums.grads) / jnp.square(safe_w)
  big = safe_w * grad_sq_norm  # B
  trace = (sums.noise.sq_over_weight - big) / jnp.where(ok, n - 1.0, 1.0)
  g_sq = grad_sq_norm - trace / safe_w
  nan = jnp.full((), jnp.nan, jnp.float32)
  return {'g_sq': jnp.where(ok, g_sq, nan), 'trace_sigma': jnp.where(ok, trace, nan),
          'b_simple': jnp.where(ok, trace / g_sq, nan)}


def check_float_params(params):
  """Raises ConfigError naming the first non-float leaf: gradients need float params."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ConfigError(
          f'params{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; '
          'accumulation needs floating-point params (float32, bfloat16, ...).')


def split_microbatches(batch, num_microbatches: int, row_groups: int = 1):
  """Reshapes every leaf [N, ...] of `batch` to [num_microbatches, N // num_microbatches, ...].

  `row_groups` G > 1: the rows are G consecutive blocks (e.g. the devices of an `fsdp` group);
  micro-batch j is then the j-th of K equal chunks of every block, in block order."""
  check_int('num_microbatches', num_microbatches)
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ConfigError('batch has no arrays.')
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ConfigError(
        'every batch leaf needs the same leading batch axis; '
        f'got leading sizes {sorted(map(str, sizes))}.')
  (n,) = sizes
  if n % num_microbatches:
    raise ConfigError(
        f'batch size {n} is not divisible by num_microbatches={num_microbatches}; '
        f'allowed num_microbatches for this batch: '
        f'{[k for k in range(1, n + 1) if n % k == 0]}.')
  if n % (num_microbatches * row_groups):
    raise ConfigError(f'batch size {n} does not split into row_groups={row_groups} blocks of '
                      f'num_microbatches={num_microbatches} equal chunks.')
  if row_groups == 1:
    return jax.tree.map(
        lambda x: x.reshape((num_microbatches, n // num_microbatches) + x.shape[1:]), batch)
  # [G, K, b] -> [K, G, b]: micro-batch j takes the j-th chunk of every group's rows.
  b = n // (num_microbatches * row_groups)
  return jax.tree.map(lambda x: jnp.swapaxes(
      x.reshape((row_groups, num_microbatches, b) + x.shape[1:]), 0, 1).reshape(
          (num_microbatches, row_groups * b) + x.shape[1:]), batch)


def _unpack_loss(out):
  if not isinstance(out, tuple) or len(out) not in (2, 3):
    raise ConfigError(
        'loss_fn must return (loss_sum, weight) or (loss_sum, weight, aux); '
        f'got {type(out).__name__}.')
  loss_sum, weight = out[0], out[1]
  aux = out[2] if len(out) == 3 else None
  for name, v in (('loss_sum', loss_sum), ('weight', weight)):
    if jnp.ndim(v) != 0:
      raise ConfigError(f'loss_fn returned {name} of shape {jnp.shape(v)}; it must be a scalar.')
  return loss_sum, weight, aux


def _clip_weighted(grads, weight, max_norm):
  """Clips the micro-batch *mean* gradient to `max_norm`, returns it times `weight`."""
  safe_w = jnp.where(weight > 0, weight, 1.0)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))) / safe_w
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)


def check_loss_fn(loss_fn, with_state: bool) -> None:
  """`loss_fn` takes (params, batch, rng), plus model_state `with_state`; else a ConfigError
  naming its signature (before anything is traced)."""
  want = 4 if with_state else 3
  try:
    signature = inspect.signature(loss_fn)
  except (TypeError, ValueError):  # no signature to inspect (a builtin): the call will tell
    return
  try:
    signature.bind(*range(want))
  except TypeError:
    names = '(params, batch, rng' + (', model_state)' if with_state else ')')
    raise ConfigError(
        f'loss_fn={getattr(loss_fn, "__name__", loss_fn)!r} must take {want} positional '
        f'arguments {names}' + (' (state_rules is given: the model has state)'
                                if with_state else '') +
        f'; its signature is {signature}. An unused rng: `del rng`.') from None


def as_key(rng):
  """`rng` as a JAX key: a key, raw key data, or an int seed (as `init_train_state` takes)."""
  if rng is None or isinstance(rng, jax.Array) or hasattr(rng, 'dtype'):
    return rng
  if isinstance(rng, int) and not isinstance(rng, bool):
    return jax.random.key(rng)
  raise ConfigError(f'rng={rng!r}; allowed: None, an int seed or a jax.random key.')


def accumulate_sums(
    loss_fn: Callable[..., tuple],
    params: PyTree,
    batch: PyTree,
    *,
    num_microbatches: int,
    rng: jax.Array | None = None,
    index_offset: jax.Array | int = 0,
    accum_dtype=jnp.float32,
    clip_microbatch_norm: float | None = None,
    loss_scale: jax.Array | None = None,
    noise_stats: bool = False,
) -> tuple[GradSums, PyTree]:
  """Sums gradients, loss sums and weights over micro-batches with one `lax.scan`.

  Args:
    loss_fn: `loss_fn(params, microbatch, rng) -> (loss_sum, weight[, aux])`.
    params: float pytree.
    batch: pytree whose leaves share a leading batch axis divisible by num_microbatches.
    num_microbatches: K, the scan length.
    rng: optional key; micro-batch j gets `fold_in(rng, index_offset + j)`, so dropout differs
      per micro-batch and is reproducible (and the same whichever mode split the cycle).
    index_offset: index of this call's first micro-batch within its accumulation cycle.
    accum_dtype: dtype of the gradient sums (float32 whatever the compute dtype).
    clip_microbatch_norm: if set, each micro-batch's *mean* gradient is clipped to this global
      norm before it is added back with its weight (so the result is the weight-averaged
      clipped micro-batch gradient).
    loss_scale: optional float32 scalar (float16 loss scaling): the micro-batch's mean loss
      (loss_sum / weight) times the scale is differentiated, and the gradient multiplied back
      by weight / scale in `accum_dtype` before it is checked and added. The sums are those of
      the unscaled loss_sum.
    noise_stats: also sum what the gradient noise scale needs (`GradSums.noise`; see
      `noise_scale`): one more squared norm of each micro-batch's gradient, two scalars.

  Returns:
    (GradSums, aux) where aux is the per-micro-batch aux stacked on a leading K axis (None if
    loss_fn returns no aux). Micro-batches with a non-finite loss or gradient add zeros and
    are counted in `GradSums.nonfinite`; `scan_microbatches` also says which they were.
  """
  sums, aux, _, _ = scan_microbatches(
      loss_fn, params, batch, num_microbatches=num_microbatches, rng=rng,
      index_offset=index_offset, accum_dtype=accum_dtype,
      clip_microbatch_norm=clip_microbatch_norm, loss_scale=loss_scale,
      noise_stats=noise_stats)
  return sums, aux


def _loss_scale_unit(weight):
  """The loss scale multiplies the micro-batch's *mean* loss (loss_sum / weight), as it would a
  mean loss, so the usual starting scale (2**15) suits any micro-batch size: the gradient of a
  sum over thousands of tokens would overflow float16 at a scale that many times smaller."""
  weight = jax.lax.stop_gradient(weight)
  return jnp.where(weight > 0, weight, 1.0)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Scanned(NamedTuple):
  """What `scan_microbatches` returns."""
  sums: GradSums
  aux: Any  # per-micro-batch aux stacked on a leading K axis, or None
  bad: jax.Array  # bool[K]: which micro-batches were non-finite
  state_acc: Any  # the model state's accumulator (`model_state.StateAcc`), or None


def _microbatch_grads(loss_fn, params, mb, key, view, loss_scale, accum_dtype):
  """One micro-batch's (loss_sum, weight, aux, new model state, gradient of loss_sum) in
  float32 / `accum_dtype`, unscaled (see `accumulate_sums`' loss_scale)."""
  with_state = view is not None

  def grad_fn(p):
    out = loss_fn(p, mb, key) if not with_state else loss_fn(p, mb, key, view)
    new_state = None
    if with_state:
      if not isinstance(out, tuple) or len(out) != 2 or not isinstance(out[0], tuple):
        got = (f'a {len(out)}-tuple of ({", ".join(type(x).__name__ for x in out)})'
               if isinstance(out, tuple) else type(out).__name__)
        raise ConfigError(
            'with a model state (state_rules given), loss_fn must return ((loss_sum, weight'
            f'[, aux]), new_model_state); got {got}. Return the new model state beside the '
            'loss (the state it was given, if this forward pass changes none).')
      out, new_state = out
      if jax.tree.structure(new_state) != jax.tree.structure(view):
        raise ConfigError(
            f'loss_fn returned a new model state shaped {jax.tree.structure(new_state)}; the '
            f'model state it was given is shaped {jax.tree.structure(view)}.')
    loss_sum, weight, aux = _unpack_loss(out)
    loss_sum, weight = loss_sum.astype(jnp.float32), jnp.asarray(weight, jnp.float32)
    scaled = loss_sum if loss_scale is None else loss_sum * (loss_scale / _loss_scale_unit(weight))
    return scaled, (loss_sum, weight, aux, new_state)

  (_, (loss_sum, weight, aux, new_state)), grads = jax.value_and_grad(grad_fn, has_aux=True)(
      params)
  grads = jax.tree.map(lambda g: g.astype(accum_dtype), grads)
  if loss_scale is not None:
    unscale = (_loss_scale_unit(weight) / loss_scale).astype(accum_dtype)
    grads = jax.tree.map(lambda g: g * unscale, grads)
  return loss_sum, weight, aux, new_state, grads


def _add_microbatch(carry: GradSums, grads, loss_sum, weight, clip_norm, noise_stats,
                    reduce_microbatch, mask: bool = True):
  """`carry` plus one micro-batch, or plus zeros (counted as non-finite) where its loss,
  weight or gradient is not finite or its weight is negative. Returns (sums, finite).

  `mask=False` checks only the scalars (loss, weight) here and adds the gradient as it is:
  one non-finite gradient then makes the sum non-finite, which the update checks once (see
  `count_nonfinite_sum`); the gradient is read once, by the add."""
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(weight) & (weight >= 0)
  if mask:
    finite &= _all_finite(grads)
  if clip_norm is not None:
    grads = _clip_weighted(grads, weight, clip_norm)
  # jnp.where, not a multiplication by 0: 0 * NaN is NaN.
  keep = lambda x: jnp.where(finite, x, jnp.zeros_like(x))
  noise = None
  if noise_stats:  # this micro-batch as a small-batch sample: |S_j|^2 / w_j
    sample = finite & (weight > 0)
    sq = jnp.where(sample, _sq_norm(grads), 0.0) / jnp.where(sample, weight, 1.0)
    noise = NoiseSums(carry.noise.sq_over_weight + sq,
                      carry.noise.samples + sample.astype(jnp.float32))
  kept = jax.tree.map(keep, grads) if mask else grads
  if reduce_microbatch is not None:
    kept = reduce_microbatch(kept)
  return GradSums(
      grads=jax.tree.map(jnp.add, carry.grads, kept),
      loss_sum=carry.loss_sum + keep(loss_sum),
      weight=carry.weight + keep(weight),
      nonfinite=carry.nonfinite + (~finite).astype(jnp.float32),
      noise=noise), finite


def scan_microbatches(
    loss_fn, params, batch, *, num_microbatches, rng=None, index_offset=0,
    accum_dtype=jnp.float32, clip_microbatch_norm=None, loss_scale=None, noise_stats=False,
    model_state=None, state_rules=None, state_acc=None, reduce_microbatch=None,
    sums_like=None, mask_microbatches=True, row_groups=1) -> Scanned:
  """`accumulate_sums` (same arguments), plus which micro-batches were non-finite and the
  model state's accumulator (a `Scanned`).

  The one accumulation core: `accumulate_sums` and every train-step mode call this.

  With `model_state` (see `accumjax.model_state`), `loss_fn(params, microbatch, rng,
  model_state)` returns `((loss_sum, weight[, aux]), new_state)`; `state_rules` (required) say
  how the micro-batches' new states combine, and `state_acc` is the accumulator to continue
  (default: an empty one).

  `mask_microbatches=False` (the train step under the 'skip_update' policy): a micro-batch's
  gradient is not checked and masked on its own, only its loss and weight; a non-finite
  gradient makes the sums' gradients non-finite, and `count_nonfinite_sum` counts it once per
  update (the whole update is skipped anyway). Same result wherever the update is applied.

  `reduce_microbatch` (FSDP, see `parallel.reduced_sums`): applied to every micro-batch's
  gradient after the non-finite check, before it is added; the sums then take the shapes of
  `sums_like` (e.g. each device's shard of the params). `row_groups`: see
  `split_microbatches` (the 'layer' gather's micro-batch takes rows of every `fsdp` device).
  """
  check_float_params(params)
  check_bool('noise_stats', noise_stats)
  microbatches = split_microbatches(batch, num_microbatches, row_groups)
  with_state = model_state is not None
  check_loss_fn(loss_fn, with_state)
  rng = as_key(rng)
  if with_state:
    if state_rules is None:
      raise ConfigError(f'model_state needs state_rules: one of {ms.RULES} or a pytree of them.')
    ms.expand_rules(model_state, state_rules)
    if state_acc is None:
      state_acc = ms.init_acc(model_state, state_rules)

  def body(carry, xs):
    carry, acc = carry
    mb, index = xs
    key = None if rng is None else jax.random.fold_in(rng, index_offset + index)
    view = ms.view(model_state, acc, state_rules) if with_state else None
    loss_sum, weight, aux, new_state, grads = _microbatch_grads(
        loss_fn, params, mb, key, view, loss_scale, accum_dtype)
    new, finite = _add_microbatch(carry, grads, loss_sum, weight, clip_microbatch_norm,
                                  noise_stats, reduce_microbatch, mask_microbatches)
    if with_state:
      acc = ms.add(acc, state_rules, model_state, new_state, weight, finite)
    return (new, acc), (aux, ~finite)

  zeros = zero_sums(params if sums_like is None else sums_like, accum_dtype, noise_stats)
  (sums, state_acc), (aux, bad_K) = jax.lax.scan(
      body, (zeros, state_acc), (microbatches, jnp.arange(num_microbatches, dtype=jnp.int32)))
  return Scanned(sums, aux, bad_K, state_acc)


def all_finite_given(sq_norm: jax.Array, tree) -> jax.Array:
  """Whether every leaf of `tree` is finite, given `sq_norm` = |tree|^2 (float32).

  A NaN or an Inf anywhere makes the sum of squares non-finite, so a finite `sq_norm` proves
  the tree finite without reading it again. A non-finite one may also be the overflow of a
  finite but huge tree (|tree| > ~1.8e19): only then is the tree read, inside a `lax.cond`
  whose branch runs on that rare call alone."""
  return jax.lax.cond(jnp.isfinite(sq_norm), lambda: jnp.ones((), bool),
                      lambda: _all_finite(tree))


def count_nonfinite_sum(sums: GradSums, sq_norm: jax.Array | None = None) -> GradSums:
  """`sums` with a non-finite gradient sum counted as one non-finite micro-batch, where no
  micro-batch's loss or weight was (the sums of `mask_microbatches=False`): one check of the
  update's gradient, instead of one per micro-batch. With `sq_norm` (|sums.grads|^2, which the
  update needs anyway for its norm and clipping) the gradient is not read again
  (`all_finite_given`)."""
  finite = _all_finite(sums.grads) if sq_norm is None else all_finite_given(sq_norm, sums.grads)
  hidden = (sums.nonfinite == 0) & ~finite
  return sums._replace(nonfinite=sums.nonfinite + hidden.astype(sums.nonfinite.dtype))


def normalize(sums: GradSums):
  """Divides once: (mean gradient, mean loss). Zero total weight gives zeros, never NaN."""
  has_weight = sums.weight > 0
  safe_w = jnp.where(has_weight, sums.weight, 1.0)
  grads = jax.tree.map(lambda g: jnp.where(has_weight, g / safe_w.astype(g.dtype), 0), sums.grads)
  return grads, jnp.where(has_weight, sums.loss_sum / safe_w, 0.0)


def accumulate_gradients(
    loss_fn, params, batch, *, num_microbatches, rng=None, accum_dtype=jnp.float32,
    clip_microbatch_norm=None, noise_stats=False, model_state=None, state_rules=None,
    mask_microbatches=True):
  """Gradient of (sum of all loss_sums) / (sum of all weights) over K micro-batches.

  Same arguments as `accumulate_sums`. Returns `(grads, metrics)` with metrics `loss` (the
  token-weighted mean loss), `loss_sum`, `weight`, `nonfinite` (micro-batches left out for a
  NaN or Inf: the result is then the gradient of the others) and, if loss_fn has one, `aux`.
  With zero total weight, grads and loss are zeros (the optimizer wrapper skips such updates).
  `noise_stats=True` adds `noise`: {'g_sq', 'trace_sigma', 'b_simple'}, the gradient noise
  statistics of this batch (see `noise_scale`; needs num_microbatches >= 2).

  With `model_state` and `state_rules` (see `accumjax.model_state`; loss_fn then takes the
  state and returns `(losses, new_state)`), metrics add `model_state`: the new state from the
  K micro-batches combined by the rules.

  `mask_microbatches=False`: a micro-batch whose gradient alone is non-finite is not left out
  (its loss and weight are checked, not its gradient): the result is then non-finite and
  `nonfinite` counts it as one; a cheaper scan when any non-finite value means "skip".
  """
  if noise_stats is True and isinstance(num_microbatches, int) and num_microbatches < 2:
    raise ConfigError(
        f'noise_stats=True needs num_microbatches >= 2; got {num_microbatches}: with one '
        'micro-batch there is no small-batch sample to compare the big batch with.')
  sums, aux, _, acc = scan_microbatches(
      loss_fn, params, batch, num_microbatches=num_microbatches, rng=rng,
      accum_dtype=accum_dtype, clip_microbatch_norm=clip_microbatch_norm,
      noise_stats=noise_stats, model_state=model_state, state_rules=state_rules,
      mask_microbatches=mask_microbatches)
  if not mask_microbatches:
    sums = count_nonfinite_sum(sums)
  grads, loss = normalize(sums)
  metrics = {'loss': loss, 'loss_sum': sums.loss_sum, 'weight': sums.weight,
             'nonfinite': sums.nonfinite}
  if noise_stats:
    metrics['noise'] = noise_scale(sums)
  if aux is not None:
    metrics['aux'] = aux
  if acc is not None:
    metrics['model_state'] = ms.finalize(model_state, acc, state_rules)
  return grads, metrics
