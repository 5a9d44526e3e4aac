"""Losses in (loss_sum, weight) form.

Every loss in accumjax returns the *sum* of per-token (or per-example) losses and the total
weight they carry, never a mean. The division happens once, after every micro-batch, call and
device has been summed; that is what makes accumulation equal to one big batch even when
micro-batches carry different token counts.
"""

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
  """Token-level cross entropy with a padding mask.

  Args:
    logits_BxTxV: logits of any float dtype; the loss is computed in float32.
    targets_BxT: integer targets.
    mask_BxT: 1 for real tokens, 0 for padding (bool, int or float).

  Returns:
    (loss_sum, weight): float32 scalars, the summed negative log-likelihood over unmasked
    tokens and the number of unmasked tokens.
  """
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  nll_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  mask_BxT = mask_BxT.astype(jnp.float32)
  return jnp.sum(nll_BxT * mask_BxT), jnp.sum(mask_BxT)


def per_example_loss(losses_B, weights_B=None):
  """Turns per-example losses into (loss_sum, weight); `weights_B` defaults to ones."""
  losses_B = losses_B.astype(jnp.float32)
  if weights_B is None:
    weights_B = jnp.ones_like(losses_B)
  weights_B = weights_B.astype(jnp.float32)
  return jnp.sum(losses_B * weights_B), jnp.sum(weights_B)
