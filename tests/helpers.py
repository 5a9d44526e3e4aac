"""Runs accumjax the way a training loop does, for comparison with tests/reference.py."""

import jax
import numpy as np

import accumjax
from accumjax import loop
from accumjax.lm import config as lm_config
from tests import reference


def lm_loss(params, batch, rng):
  logits = reference.logits_fn(params, batch['inputs'], rng, rate=batch.get('rate', 0.0))
  return accumjax.token_cross_entropy(logits, batch['targets'], batch['mask'])


def train_config(**flat) -> lm_config.TrainConfig:
  """An LM TrainConfig from flat settings (`batch_size=4, d_model=32, ...`)."""
  return lm_config.from_flat(flat)


calls_of = loop.split_calls  # one update's (global) batch -> the calls of config.mode


def run_accumjax(params, batches, opt, config, loss_fn=lm_loss, seed=0, hint=True):
  """Trains with accumjax through the call driver; returns the final state, per-update losses
  and (state, metrics) after every call.

  `hint`: pass `last_call` as the driver does (False: None, the step reads the cycle's
  position from the state).
  """
  tx = accumjax.accumulating_optimizer(opt, config)
  state = accumjax.init_train_state(params, tx, jax.random.key(seed))
  # Not donated: the states after every call are kept for comparison.
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config), donate=False)
  if not hint:
    counted, step = step, lambda state, batch, last_call: counted(state, batch)
  losses, calls = [], []
  for batch in batches:
    done = loop.run_update(step, state, calls_of(batch, config), config,
                           after_call=lambda s, m, _: calls.append((s, m)))
    state = done.state
    assert done.complete and bool(done.metrics['updated'])
    losses.append(float(done.metrics['loss']))
  return state, np.array(losses), calls
