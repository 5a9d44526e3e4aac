"""Gradient noise statistics (core.noise_scale): unbiased on a model whose |G|^2 and tr(Sigma)
are known in closed form, with equal and with very unequal micro-batch weights, where the
natural shortcuts are biased; and the train step's per-update statistics equal an independent
per-micro-batch reference in every mode."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accumjax
from accumjax import core
from tests import reference
from tests.helpers import calls_of, lm_loss

D, SIGMA, K, ROWS_PER_MB = 6, 1.0, 8, 32
# Linear regression, x ~ N(0, I_D), y = x.w* + eps, eps ~ N(0, SIGMA^2), loss 0.5 (x.w - y)^2
# per example. At w = 0 (delta = w - w* = -w*), the per-example gradient g = x (x.delta - eps)
# has mean G = delta and covariance Sigma = (|delta|^2 + SIGMA^2) I + delta delta^T (Gaussian
# fourth moments: E[x x^T (x.delta)^2] = |delta|^2 I + 2 delta delta^T), so
W_STAR = np.linspace(-0.6, 0.6, D)
TRUE_G_SQ = float(W_STAR @ W_STAR)
TRUE_TRACE = D * (TRUE_G_SQ + SIGMA**2) + TRUE_G_SQ
EQUAL = np.full(K, ROWS_PER_MB)
UNEQUAL = np.array([1, 2, 3, 5, 8, 13, 21, 32])  # real examples per micro-batch, rest padding
BATCHES = 3000


def regression_loss(params, mb, rng):
  r = mb['x'] @ params['w'] - mb['y']
  return jnp.sum(0.5 * r * r * mb['m']), jnp.sum(mb['m'])


def _batches(weights, seed=0):
  rng = np.random.default_rng(seed)
  rows = K * ROWS_PER_MB
  x = rng.normal(size=(BATCHES, rows, D)).astype(np.float32)
  y = (x @ W_STAR + SIGMA * rng.normal(size=(BATCHES, rows))).astype(np.float32)
  m = (np.arange(ROWS_PER_MB)[None, :] < weights[:, None]).astype(np.float32).reshape(rows)
  return {'x': x, 'y': y, 'm': np.broadcast_to(m, (BATCHES, rows))}


@jax.jit
def _stats(batches):
  """accumjax's statistics of every batch, plus per-micro-batch mean gradients for the
  shortcuts (from an independent per-micro-batch jax.grad)."""
  params = {'w': jnp.zeros(D)}

  def one(batch):
    _, metrics = accumjax.accumulate_gradients(regression_loss, params, batch,
                                               num_microbatches=K, noise_stats=True)
    mbs = jax.tree.map(lambda x: x.reshape((K, ROWS_PER_MB) + x.shape[1:]), batch)
    sums = jax.vmap(lambda mb: jax.grad(lambda p: regression_loss(p, mb, None)[0])(params)['w'])(
        mbs)
    return metrics['noise'], sums, mbs['m'].sum(1)

  return jax.lax.map(one, batches)


@pytest.fixture(scope='module', params=['equal', 'unequal'])
def measured(request):
  weights = EQUAL if request.param == 'equal' else UNEQUAL
  noise, sums, w = jax.device_get(_stats(_batches(weights)))
  return request.param, noise, np.asarray(sums, np.float64), np.asarray(w, np.float64)


def test_means_are_within_3_percent_of_the_truth(measured):
  name, noise, _, _ = measured
  for key, truth in (('g_sq', TRUE_G_SQ), ('trace_sigma', TRUE_TRACE)):
    values = np.asarray(noise[key], np.float64)
    mean, se = values.mean(), values.std() / np.sqrt(len(values))
    assert se < 0.01 * truth, (name, key, se)  # the test can resolve a 3% bias
    assert abs(mean - truth) <= 0.03 * truth, (name, key, mean, truth, se)
  assert np.median(noise['b_simple']) == pytest.approx(TRUE_TRACE / TRUE_G_SQ, rel=0.15)


def test_the_shortcuts_are_biased(measured):
  """What the estimator must not be: |M|^2 alone for |G|^2 (biased up by tr(Sigma) / W), and,
  with unequal weights, the paper's two-size formula fed the plain mean of the micro-batch
  |m_j|^2 and the mean weight as B_small (it ignores that 1/w_j is not 1/mean(w))."""
  name, _, sums, w = measured
  big_w = w.sum(1)
  big_mean = sums.sum(1) / big_w[:, None]
  big_sq = np.sum(big_mean**2, axis=1)
  assert big_sq.mean() > 1.05 * TRUE_G_SQ
  small_sq = np.mean(np.sum((sums / w[..., None])**2, axis=2), axis=1)
  b_small = w.mean(1)
  naive_trace = (small_sq - big_sq) / (1 / b_small - 1 / big_w)
  off = abs(naive_trace.mean() - TRUE_TRACE) / TRUE_TRACE
  if name == 'unequal':
    assert off > 0.5, off  # badly biased
  else:
    assert off < 0.03, off  # with equal weights it is the same estimator


def test_one_microbatch_is_refused_and_too_few_samples_are_nan():
  batch = jax.tree.map(lambda x: x[0], _batches(EQUAL))
  with pytest.raises(accumjax.ConfigError, match='num_microbatches >= 2'):
    accumjax.accumulate_gradients(regression_loss, {'w': jnp.zeros(D)}, batch,
                                  num_microbatches=1, noise_stats=True)
  with pytest.raises(accumjax.ConfigError, match='noise_stats'):
    accumjax.AccumConfig(num_microbatches=1, microbatch_size=4, noise_stats=True)
  # one micro-batch with tokens out of K: no small-batch comparison is possible
  only_one = dict(batch, m=np.where(np.arange(K * ROWS_PER_MB) < ROWS_PER_MB, batch['m'], 0))
  _, metrics = accumjax.accumulate_gradients(regression_loss, {'w': jnp.zeros(D)}, only_one,
                                             num_microbatches=K, noise_stats=True)
  assert all(np.isnan(float(v)) for v in metrics['noise'].values())


MODES = {'scan': None, 'multisteps': None, 'hybrid': 2}


@pytest.mark.parametrize('mode', MODES)
def test_train_step_statistics_equal_a_per_microbatch_reference(mode):
  """Every mode's per-update g_sq, trace_sigma and b_simple equal the float64 reference over
  the same micro-batches (padded, very different token counts), across two updates (the
  state's noise sums reset between them), with the interim calls hinted."""
  k, rows = 4, 48
  config = accumjax.AccumConfig(num_microbatches=k, microbatch_size=rows // k, mode=mode,
                                microbatches_per_call=MODES[mode], noise_stats=True)
  tx = accumjax.accumulating_optimizer(optax.sgd(0.5), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config))
  state = accumjax.init_train_state(reference.init_params(), tx, 0, config)
  for batch in reference.make_batches(2, rows):
    params = state.params
    expected = reference.noise_reference(params, batch, k)
    done = accumjax.run_update(step, state, calls_of(batch, config), config)
    state = done.state
    got = {key: float(done.metrics[key]) for key in expected}
    chex.assert_trees_all_close(got, expected, rtol=2e-4)
    if state.cycle is not None:  # scan mode keeps no cycle between calls
      chex.assert_trees_all_equal(jax.device_get(state.cycle.sums.noise),
                                  jax.device_get(core.zero_noise()))


def test_interim_calls_report_nan_and_the_flush_reports_the_partial_update():
  k, rows = 4, 48
  config = accumjax.AccumConfig(num_microbatches=k, microbatch_size=rows // k,
                                mode='multisteps', noise_stats=True)
  tx = accumjax.accumulating_optimizer(optax.sgd(0.5), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config))
  flush = jax.jit(accumjax.make_flush(tx, config))
  state = accumjax.init_train_state(reference.init_params(), tx, 0, config)
  batch = reference.make_batches(1, rows)[0]
  calls = calls_of(batch, config)
  expected = reference.noise_reference(state.params, jax.tree.map(lambda x: x[:36], batch), 3)
  for call in calls[:3]:
    state, metrics = step(state, call, last_call=False)
    assert np.isnan(float(metrics['b_simple']))
  state, metrics = flush(state)
  assert bool(metrics['updated'])
  chex.assert_trees_all_close({key: float(metrics[key]) for key in expected}, expected,
                              rtol=2e-4)
  assert float(state.cycle.sums.noise.samples) == 0.0


def test_a_state_whose_cycle_lacks_noise_sums_is_refused():
  config = accumjax.AccumConfig(num_microbatches=2, microbatch_size=4, mode='multisteps',
                                noise_stats=True)
  off = dataclasses_replace(config, noise_stats=False)
  state = accumjax.init_train_state(reference.init_params(), optax.sgd(0.5), 0, off)
  step = accumjax.make_train_step(lm_loss, optax.sgd(0.5), config)
  with pytest.raises(accumjax.ConfigError, match='noise_stats=True.*init_train_state'):
    step(state, reference.make_batches(1, 4)[0], last_call=True)
  # A state built without any config gets the step's cycle (noise sums included).
  bare = accumjax.init_train_state(reference.init_params(), optax.sgd(0.5), 0)
  state, m = step(bare, reference.make_batches(1, 4)[0], last_call=False)
  assert float(state.cycle.sums.noise.samples) == 1.0 and not bool(m['updated'])


def test_trainer_logs_records_and_plots_b_simple(tmp_path, corpus, capsys):
  from tests.test_train import TINY_ARGV, _cli, _records
  out = tmp_path / 'run'
  rc, _ = _cli(capsys, *TINY_ARGV, '--steps', '4', '--log-every', '2', '--data', str(corpus),
               '--out', str(out), '--accum-mode', 'multisteps')
  assert rc == 0
  train, _, summary = _records(out)
  for r in train:
    assert r['k'] == 2 and r['update_tokens'] > 0
    assert np.isfinite(r['trace_sigma']) and np.isfinite(r['g_sq'])
    assert r['b_simple'] == pytest.approx(r['trace_sigma'] / r['g_sq'], rel=1e-5)
  # the smoothed value is the ratio of the EMAs of numerator and denominator
  from accumjax.lm.train import NOISE_EMA
  tr, gs = train[0]['trace_sigma'], train[0]['g_sq']
  for r in train[1:]:
    tr, gs = NOISE_EMA * tr + (1 - NOISE_EMA) * r['trace_sigma'], NOISE_EMA * gs + (
        1 - NOISE_EMA) * r['g_sq']
    assert r['b_simple_ema'] == pytest.approx(tr / gs, rel=1e-6)
  assert summary['b_simple_ema'] == train[-1]['b_simple_ema']
  png = (out / 'noise_scale.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


@pytest.mark.slow
def test_noise_stats_are_harmless_to_toggle_on_resume_and_off_for_k1(tmp_path, corpus, capsys):
  """The params do not depend on --noise-stats: a run that turns it on when resumed ends where
  a run with it on all along ends (to float32 rounding); with K = 1 it is off, and says so."""
  from tests.test_train import TINY_ARGV, _cli, _records
  argv = [*TINY_ARGV, '--data', str(corpus), '--schedule', 'constant', '--warmup-steps', '0']
  assert _cli(capsys, *argv, '--steps', '2', '--no-noise-stats', '--out', str(tmp_path / 'a'))[
      0] == 0
  assert 'b_simple' not in _records(tmp_path / 'a')[0][-1]
  assert _cli(capsys, *argv, '--steps', '4', '--resume', '--out', str(tmp_path / 'a'))[0] == 0
  assert _cli(capsys, *argv, '--steps', '4', '--out', str(tmp_path / 'b'))[0] == 0
  a, b = _records(tmp_path / 'a'), _records(tmp_path / 'b')
  # Not bitwise: with the statistics on, the compiled scan also reads each gradient for its
  # squared norm, and XLA fuses the gradient differently (last bits). Before the default
  # policy stopped masking each micro-batch (issue 31) the select kept them bitwise equal.
  assert [r['loss'] for r in a[0]] == pytest.approx([r['loss'] for r in b[0]], rel=1e-6)
  assert [r['b_simple'] for r in a[0][2:]] == pytest.approx(
      [r['b_simple'] for r in b[0][2:]], rel=1e-4)
  # K = 1: no small-batch sample; the run trains without the statistics
  k1 = [x if x != '2' or argv[i - 1] != '--grad-accum-steps' else '1'
        for i, x in enumerate(argv)]
  assert _cli(capsys, *k1, '--steps', '1', '--out', str(tmp_path / 'k1'))[0] == 0
  assert 'b_simple' not in _records(tmp_path / 'k1')[0][-1]


def test_switching_noise_stats_on_mid_cycle_reports_nan_for_that_update():
  from accumjax.lm import resume
  config = accumjax.AccumConfig(num_microbatches=4, microbatch_size=12, mode='multisteps',
                                noise_stats=True)
  tx = accumjax.accumulating_optimizer(optax.sgd(0.5), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config))
  calls = calls_of(reference.make_batches(1, 48)[0], config)
  off = dataclasses_replace(config, noise_stats=False)
  plain = accumjax.init_train_state(reference.init_params(), optax.sgd(0.5), 0, off)
  plain, _ = accumjax.jit_train_step(accumjax.make_train_step(
      lm_loss, accumjax.accumulating_optimizer(optax.sgd(0.5), off), off))(plain, calls[0],
                                                                          last_call=False)
  log = type('L', (), {'info': lambda self, msg: None})()
  state = resume._convert_noise(plain, config, log)
  for call in calls[1:3]:
    state, _ = step(state, call, last_call=False)
  state, m = step(state, calls[3], last_call=True)
  assert np.isnan(float(m['b_simple'])) and np.isnan(float(m['trace_sigma']))
  assert float(state.cycle.sums.noise.samples) == 0.0  # the next update counts again


def dataclasses_replace(config, **kw):
  import dataclasses
  return dataclasses.replace(config, **kw)
