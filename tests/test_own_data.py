"""Your own data through the library: the end of the data padded with weight-0 rows (exact),
`loop.Updates` over an epoch, the data position saved in the checkpoint (a mid-cycle resume
bitwise without bookkeeping), and the smoothed noise scale with its reading."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accumjax
from accumjax.checkpoint import Checkpointer
from accumjax.noise import SmoothedNoiseScale

N = 100  # not a multiple of the micro-batch (16): the last one is padded


def loss_fn(params, batch, rng):
  del rng
  per_row = jnp.sum((jnp.tanh(batch['x'] @ params['w1']) @ params['w2'] - batch['y']) ** 2, -1)
  return jnp.sum(per_row * batch['w']), jnp.sum(batch['w'])


def _data(n=N, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  return {'x': jnp.asarray(x), 'y': jnp.asarray(np.sin(x[:, :2])),
          'w': jnp.asarray(rng.integers(1, 4, n).astype(np.float32))}


PARAMS = {'w1': jax.random.normal(jax.random.key(1), (5, 8)) / 3, 'w2': jnp.zeros((8, 2))}


def test_pad_rows_pads_with_weight_zero_rows_and_the_update_is_the_real_rows_big_batch():
  data = _data()
  padded = accumjax.loop.pad_rows(data, 16, weight='w')
  assert padded['x'].shape == (112, 5) and float(padded['w'][N:].sum()) == 0.0
  config = accumjax.AccumConfig(num_microbatches=7, microbatch_size=16)
  opt = optax.sgd(0.5)
  state = accumjax.init_train_state(PARAMS, opt, 0, config)
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, opt, config))
  done = accumjax.run_update(step, state, accumjax.loop.split_calls(padded, config), config)

  def big(p):  # the 100 real rows, no padding, written without the library
    s, w = loss_fn(p, data, None)
    return s / w
  want = jax.tree.map(lambda p, g: p - 0.5 * g, PARAMS, jax.grad(big)(PARAMS))
  chex.assert_trees_all_close(done.state.params, want, atol=1e-6)
  # pad rows weighing 1 (the bug pad_rows avoids) would move the update measurably
  ones = dict(padded, w=padded['w'].at[N:].set(1.0))
  wrong = accumjax.run_update(step, accumjax.init_train_state(PARAMS, opt, 0, config),
                              accumjax.loop.split_calls(ones, config), config)
  assert not np.allclose(wrong.state.params['w2'], want['w2'], atol=1e-5)


def test_pad_rows_creates_the_weight_and_refuses_bad_input():
  out = accumjax.loop.pad_rows({'x': jnp.ones((5, 2))}, 4, weight='w')
  np.testing.assert_array_equal(out['w'], [1, 1, 1, 1, 1, 0, 0, 0])
  with pytest.raises(accumjax.ConfigError, match='multiple=0'):
    accumjax.loop.pad_rows({'x': jnp.ones((5, 2))}, 0)
  with pytest.raises(accumjax.ConfigError, match='different row counts'):
    accumjax.loop.pad_rows({'x': jnp.ones((5, 2)), 'y': jnp.ones(4)}, 4)
  with pytest.raises(accumjax.ConfigError, match=r'loop.pad_rows\(batch, 16'):
    accumjax.loop.split_calls(_data(), accumjax.AccumConfig(num_microbatches=2,
                                                            microbatch_size=16))


def _setup(mode='multisteps'):
  config = accumjax.AccumConfig(num_microbatches=4, microbatch_size=8, mode=mode,
                                noise_stats=True)
  opt = optax.adam(1e-2)
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, opt, config))
  flush = jax.jit(accumjax.make_flush(opt, config))
  data = accumjax.loop.pad_rows(_data(200, seed=2), 8, weight='w')  # 25 micro-batches
  return config, opt, step, flush, accumjax.loop.split_calls(data, config)


def test_updates_yields_each_applied_update_and_keeps_the_cut_short_cycle():
  config, opt, step, flush, calls = _setup()
  feed = accumjax.loop.Updates(step, accumjax.init_train_state(PARAMS, opt, 0, config), calls,
                               config)
  losses = [float(u.metrics['loss']) for u in feed]  # never None: only applied updates
  assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
  assert feed.consumed == 25 and int(feed.state.update_step) == 6
  assert accumjax.state.cycle_microbatches(feed.state) == 1  # the 25th, kept for what follows
  flushed = accumjax.loop.Updates(step, accumjax.init_train_state(PARAMS, opt, 0, config),
                                  calls, config, flush=flush)
  items = list(flushed)
  assert len(items) == 7 and int(flushed.state.update_step) == 7  # the flush is the last
  assert accumjax.state.cycle_microbatches(flushed.state) == 0


def test_the_data_position_travels_in_the_checkpoint_and_resume_is_bitwise(tmp_path):
  config, opt, step, flush, calls = _setup('hybrid')
  straight = accumjax.loop.Updates(step, accumjax.init_train_state(PARAMS, opt, 0, config),
                                   calls, config)
  for _ in straight:
    pass
  ckpt = Checkpointer(tmp_path / 'ckpt', async_save=False)
  feed = None

  def stop_mid_cycle(state, metrics, position):  # save after the 7th call (mid-cycle) and stop
    if feed.consumed == 7:
      ckpt.save(state, data_position=feed.consumed)
      return True
    return False

  feed = accumjax.loop.Updates(step, accumjax.init_train_state(PARAMS, opt, 0, config), calls,
                               config, after_call=stop_mid_cycle)
  for _ in feed:
    pass
  assert feed.consumed == 7 and accumjax.state.cycle_microbatches(feed.state) == 2
  restored = Checkpointer(tmp_path / 'ckpt').restore(
      lambda meta: accumjax.init_train_state(PARAMS, opt, 0, config))
  assert restored.data_position == 7
  resumed = accumjax.loop.Updates(step, restored.state, calls[restored.data_position:], config)
  for _ in resumed:
    pass
  chex.assert_trees_all_equal(resumed.state.params, straight.state.params)
  chex.assert_trees_all_equal(resumed.state.opt_state, straight.state.opt_state)
  with pytest.raises(accumjax.ConfigError, match='data_position=.*JSON'):
    ckpt.save(feed.state, data_position={1, 2})


def test_smoothed_noise_scale_is_a_ratio_of_averages_and_never_a_negative_batch():
  noise = SmoothedNoiseScale(decay=0.5)
  assert math.isnan(noise.b_simple()) and 'no estimate yet' in noise.reading()
  assert math.isnan(noise.update({'g_sq': -2.0, 'trace_sigma': 10.0}))  # |G|^2 in the noise
  assert 'not resolved' in noise.reading()
  noise.update({'g_sq': 6.0, 'trace_sigma': 30.0})  # EMAs: g_sq 2.0, trace 20.0
  assert noise.b_simple() == pytest.approx(10.0) and noise.resolved
  noise.update({'g_sq': float('nan'), 'trace_sigma': 1.0})  # fewer than 2 samples: left out
  noise.update({'g_sq': 100.0, 'trace_sigma': 1.0}, skipped=True)  # a skipped update too
  assert noise.state == [20.0, 2.0]
  again = SmoothedNoiseScale(decay=0.5, state=noise.state)  # from a checkpoint's metadata
  assert again.b_simple() == noise.b_simple() and 'B_simple ~ 10 tokens' in again.reading('tokens')
  with pytest.raises(accumjax.ConfigError, match='noise_stats=True'):
    noise.update({'loss': 1.0})
  with pytest.raises(accumjax.ConfigError, match='decay=1'):
    SmoothedNoiseScale(decay=1)
