"""Runs accumjax the way a training loop does, for comparison with tests/reference.py."""

import jax
import numpy as np

import accumjax
from tests import reference


def lm_loss(params, batch, rng):
  logits = reference.logits_fn(params, batch['inputs'], rng, rate=batch.get('rate', 0.0))
  return accumjax.token_cross_entropy(logits, batch['targets'], batch['mask'])


def calls_of(batch, config):
  """Splits one update's (global) batch into the per-call batches of config.mode."""
  rows = config.per_call * config.microbatch_size * config.num_devices
  n = jax.tree.leaves(batch)[0].shape[0]
  return [jax.tree.map(lambda x, s=s: x[s:s + rows], batch) for s in range(0, n, rows)]


def run_accumjax(params, batches, opt, config, loss_fn=lm_loss, seed=0, hint=True):
  """Trains with accumjax; returns final state, per-update losses and per-call metrics.

  `hint`: pass the static last_call hint as a training loop does (False: decide on device).
  """
  tx = accumjax.accumulating_optimizer(opt, config)
  state = accumjax.init_train_state(params, tx, jax.random.key(seed))
  step = jax.jit(accumjax.make_train_step(loss_fn, tx, config), static_argnames='last_call')
  losses, calls = [], []
  for batch in batches:
    batch_calls = calls_of(batch, config)
    for i, call in enumerate(batch_calls):
      last = (i + 1 == len(batch_calls)) if hint else None
      state, metrics = step(state, call, last_call=last)
      calls.append((state, metrics))
      if bool(metrics['updated']):
        losses.append(float(metrics['loss']))
  return state, np.array(losses), calls
