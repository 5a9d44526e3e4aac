"""The call driver (`accumjax.loop.run_update`): counting calls, resuming a cycle from the
state, stopping mid-cycle, the end of the data, and updates of different sizes."""

import chex
import jax
import pytest

import accumjax
from accumjax import loop
from tests import reference
from tests.helpers import calls_of, lm_loss
from tests.test_equivalence import ROWS, TOL, adamw, config_for, sgd


def _setup(config, opt=adamw):
  tx = accumjax.accumulating_optimizer(opt(), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config), donate=False)
  return accumjax.init_train_state(reference.init_params(), tx, 0), step


@pytest.mark.parametrize('mode', ['multisteps', 'hybrid'])
def test_stop_mid_cycle_and_continue_from_the_state(mode):
  config = config_for(mode, 4)
  state, step = _setup(config)
  batches = reference.make_batches(2, ROWS)
  straight = state
  for batch in batches:
    straight = loop.run_update(step, straight, calls_of(batch, config), config).state
  # Stop after the first call of update 2; the driver then takes the rest from the state.
  state = loop.run_update(step, state, calls_of(batches[0], config), config).state
  calls = calls_of(batches[1], config)
  positions = []
  cut = loop.run_update(step, state, iter(calls), config,
                        after_call=lambda s, m, p: positions.append(p) or p == 1)
  assert cut.stopped and not cut.complete and cut.calls == 1 and positions == [1]
  assert int(cut.state.cycle.microbatches) == config.per_call
  rest = loop.run_update(step, cut.state, calls[1:], config,
                         after_call=lambda s, m, p: positions.append(p))
  assert rest.complete and rest.calls == len(calls) - 1
  assert positions == list(range(1, len(calls) + 1))  # counted from the state, not from 0
  chex.assert_trees_all_equal(rest.state, straight)


def test_updates_of_different_sizes_are_each_their_own_big_batch():
  # Scan mode: an update's call may hold fewer micro-batches than the step was built for.
  config = config_for('scan', 4)
  state, step = _setup(config, sgd)
  first, second = reference.make_batches(2, ROWS)
  batches = [jax.tree.map(lambda x: x[:2 * config.microbatch_size], first), second]  # K 2, 4
  for batch, k in zip(batches, (2, 4), strict=True):
    done = loop.run_update(step, state, calls_of(batch, config), config, num_microbatches=k)
    assert done.complete and done.calls == 1
    state = done.state
  ref, _ = reference.run_reference(reference.init_params(), batches, sgd())
  chex.assert_trees_all_close(state.params, ref, rtol=TOL, atol=1e-6)


def test_hybrid_update_sizes_follow_num_microbatches():
  config = config_for('hybrid', 8)  # c = 4
  assert loop.calls_per_update(config) == 2 and loop.calls_per_update(config, 4) == 1
  with pytest.raises(accumjax.ConfigError, match='multiple of the 4 micro-batch'):
    loop.calls_per_update(config, 6)
  with pytest.raises(accumjax.ConfigError, match='at most the 4 micro-batches'):
    loop.calls_per_update(config_for('scan', 4), 8)


def test_end_of_data_and_misaligned_state():
  config = config_for('hybrid', 4)  # c = 2
  state, step = _setup(config)
  nothing = loop.run_update(step, state, [], config)
  assert nothing.exhausted and not nothing.complete and nothing.calls == 0
  assert nothing.metrics is None
  odd = state._replace(cycle=state.cycle._replace(microbatches=state.cycle.microbatches + 1))
  with pytest.raises(accumjax.ConfigError, match='not a whole number of hybrid calls of 2'):
    loop.run_update(step, odd, calls_of(reference.make_batches(1, ROWS)[0], config), config)
