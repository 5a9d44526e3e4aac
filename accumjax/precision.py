"""Mixed precision policy: float32 params and state, low-precision compute, float32 sums.

Params stay float32; `with_compute_dtype` casts them to the compute dtype inside the loss, so
the forward and backward passes run in (say) bfloat16 while the gradient with respect to the
float32 params comes back float32 and is summed in float32 by the core. bfloat16 has float32's
exponent range, so it needs no loss scaling; float16 (5 exponent bits, max 65504) does: the
dynamic loss scale lives in the train state (step.py) and is applied by the core (core.py).
"""

import jax
import jax.numpy as jnp


def cast_floats(tree, dtype):
  """Casts the floating-point leaves of `tree` to `dtype`, leaves the rest alone."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_compute_dtype(loss_fn, compute_dtype):
  """Wraps `loss_fn(params, batch, rng[, model_state])` so it computes in `compute_dtype`.

  The returned loss_sum and weight are float32 whatever the compute dtype.
  """
  compute_dtype = jnp.dtype(compute_dtype)
  if compute_dtype == jnp.float32:
    return loss_fn

  def as_float32(out):
    return (out[0].astype(jnp.float32), jnp.asarray(out[1], jnp.float32)) + tuple(out[2:])

  def wrapped(params, batch, rng, *model_state):
    out = loss_fn(cast_floats(params, compute_dtype), batch, rng, *model_state)
    if model_state:  # ((loss_sum, weight[, aux]), new_state): see accumjax.model_state
      return as_float32(out[0]), out[1]
    return as_float32(out)

  return wrapped
