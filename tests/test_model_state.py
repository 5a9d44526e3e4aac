"""State other than gradients (accumjax.model_state): what each rule gives, what equals the big
batch and what cannot, in every mode, across devices, through skips and a checkpoint.

The model is a small MLP with a hand-written BatchNorm over the real (unmasked) rows; its
state holds running averages ('mean'), a seen-examples counter ('sum'), an input amax ('max')
and a second running mean updated sequentially ('last'). The expected states are computed
here from the rows directly (numpy), without accumjax.

    python -m tests.test_model_state   (with 4 CPU devices: the data-parallel check, one JSON line)
"""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accumjax
from accumjax import checkpoint, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS, K, DIM, HIDDEN, CLASSES = 32, 4, 6, 8, 3
MOMENTUM, EPS = 0.9, 1e-5
RULES = {'bn_mean': 'mean', 'bn_var': 'mean', 'seen': 'sum', 'amax': 'max',
         'last_mean': 'last'}
DP_RULES = {k: v for k, v in RULES.items() if v != 'last'}
MODES = {'scan': None, 'multisteps': None, 'hybrid': 2}


def init_params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {'w1': jax.random.normal(k1, (DIM, HIDDEN)) / np.sqrt(DIM),
          'w2': jax.random.normal(k2, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN)}


def init_state(rules=RULES):
  full = {'bn_mean': jnp.zeros(HIDDEN), 'bn_var': jnp.ones(HIDDEN),
          'seen': jnp.zeros((), jnp.int32), 'amax': jnp.zeros(()),
          'last_mean': jnp.zeros(HIDDEN)}
  return {k: full[k] for k in rules}


def make_batch(seed=0):
  """ROWS rows; the real rows per micro-batch of ROWS / K differ a lot (8, 5, 2, 7 at K=4), and
  the micro-batches' inputs have different means, so pooled and averaged statistics differ."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(ROWS, DIM)).astype(np.float32)
  x += np.repeat(np.arange(K), ROWS // K)[:, None].astype(np.float32)  # shifted micro-batches
  real = np.zeros(ROWS, np.float32)
  for j, n in enumerate([8, 5, 2, 7]):
    real[j * (ROWS // K):j * (ROWS // K) + n] = 1.0
  return {'x': jnp.asarray(x), 'y': jnp.asarray(rng.integers(0, CLASSES, ROWS), jnp.int32),
          'mask': jnp.asarray(real)}


def bn_loss(params, batch, rng, state):
  """Cross-entropy over real rows through a BatchNorm with this micro-batch's statistics."""
  del rng
  m = batch['mask']
  n = jnp.sum(m)
  safe_n = jnp.maximum(n, 1.0)
  h = batch['x'] @ params['w1']
  mu = jnp.sum(m[:, None] * h, 0) / safe_n
  var = jnp.sum(m[:, None] * (h - mu) ** 2, 0) / safe_n
  z = jax.nn.relu((h - mu) / jnp.sqrt(var + EPS))
  logp = jax.nn.log_softmax(z @ params['w2'])
  nll = -jnp.take_along_axis(logp, batch['y'][:, None], 1)[:, 0]
  mu, var = jax.lax.stop_gradient((mu, var))
  new = {'bn_mean': MOMENTUM * state.get('bn_mean', 0) + (1 - MOMENTUM) * mu,
         'bn_var': MOMENTUM * state.get('bn_var', 0) + (1 - MOMENTUM) * var,
         'seen': state.get('seen', 0) + n.astype(jnp.int32),
         'amax': jnp.maximum(state.get('amax', 0.0), jnp.max(m[:, None] * jnp.abs(batch['x']))),
         'last_mean': MOMENTUM * state.get('last_mean', 0) + (1 - MOMENTUM) * mu}
  return (jnp.sum(nll * m), n), {k: new[k] for k in state}


def _np_stats(params, x, mask):
  h = np.asarray(x, np.float64) @ np.asarray(params['w1'], np.float64)
  rows = h[np.asarray(mask) > 0]
  if not len(rows):
    return np.zeros(h.shape[1]), np.zeros(h.shape[1]), 0
  return rows.mean(0), rows.var(0), len(rows)


def expected_state(params, batch, state, groups):
  """The rules' results from the rows, in numpy: `groups` lists the row slices the micro-batches
  held. Also returns the big batch's own statistics for the claims about them."""
  s0 = jax.tree.map(np.asarray, state)
  x, mask = np.asarray(batch['x']), np.asarray(batch['mask'])
  stats = [_np_stats(params, x[g], mask[g]) for g in groups]
  w = np.array([n for _, _, n in stats], np.float64)
  counted = w > 0
  mus = np.array([mu for mu, _, _ in stats])[counted]
  vars_ = np.array([v for _, v, _ in stats])[counted]
  wc = w[counted]
  out = {'bn_mean': MOMENTUM * s0['bn_mean'] + (1 - MOMENTUM) * (wc @ mus) / wc.sum(),
         'bn_var': MOMENTUM * s0['bn_var'] + (1 - MOMENTUM) * (wc @ vars_) / wc.sum(),
         'seen': s0['seen'] + int(mask.sum()),
         'amax': max(float(s0['amax']), float(np.abs(x[mask > 0]).max()))}
  last = s0['last_mean'] if 'last_mean' in s0 else None
  if last is not None:
    for (mu, _, n) in stats:
      last = MOMENTUM * last + (1 - MOMENTUM) * (mu if n else 0.0)  # an empty one: mu = 0
    out['last_mean'] = last
  big_mu, big_var, _ = _np_stats(params, x, mask)
  big = {'bn_mean': MOMENTUM * s0['bn_mean'] + (1 - MOMENTUM) * big_mu,
         'bn_var': MOMENTUM * s0['bn_var'] + (1 - MOMENTUM) * big_var}
  return {k: out[k] for k in state}, big


def micro_groups(k=K, rows=ROWS):
  b = rows // k
  return [slice(j * b, (j + 1) * b) for j in range(k)]


def _config(mode, devices=1, **kw):
  return accumjax.AccumConfig(num_microbatches=K, microbatch_size=ROWS // (K * devices),
                              mode=mode, microbatches_per_call=MODES[mode],
                              num_devices=devices, **kw)


def _run(mode, batches, rules=RULES, lr=0.5, **kw):
  """Trains through the call driver; returns [(params before, state before, state after)]."""
  config = _config(mode, **kw)
  tx = accumjax.accumulating_optimizer(optax.sgd(lr), config)
  state = accumjax.init_train_state(init_params(), tx, 0, config, model_state=init_state(rules),
                                    state_rules=rules)
  step = accumjax.jit_train_step(
      accumjax.make_train_step(bn_loss, tx, config, state_rules=rules), donate=False)
  history = []
  for batch in batches:
    before = state
    done = loop.run_update(step, state, loop.split_calls(batch, config), config)
    state = done.state
    history.append((before, state, done.metrics))
  return history


def test_library_call_gives_each_rule_its_result():
  params, batch, state = init_params(), make_batch(), init_state()
  _, metrics = accumjax.accumulate_gradients(bn_loss, params, batch, num_microbatches=K,
                                             model_state=state, state_rules=RULES)
  want, _ = expected_state(params, batch, state, micro_groups())
  chex.assert_trees_all_close(metrics['model_state'], want, rtol=1e-5, atol=1e-6)


def test_what_equals_the_big_batch_and_what_cannot():
  """'mean' on a running mean, 'sum' on a counter and 'max' on an amax equal the big batch;
  'mean' on a running variance cannot (it lacks the spread of the micro-batch means), nor can
  'last' (K sequential small-batch updates)."""
  params, batch, state = init_params(), make_batch(), init_state()
  _, metrics = accumjax.accumulate_gradients(bn_loss, params, batch, num_microbatches=K,
                                             model_state=state, state_rules=RULES)
  got = metrics['model_state']
  _, big = expected_state(params, batch, state, micro_groups())
  chex.assert_trees_all_close(got['bn_mean'], big['bn_mean'], rtol=1e-5, atol=1e-6)
  assert int(got['seen']) == int(np.sum(batch['mask'])) == 22
  assert float(got['amax']) == pytest.approx(
      float(jnp.max(jnp.abs(batch['x'][batch['mask'] > 0]))), rel=1e-6)
  var_gap = np.abs(np.asarray(got['bn_var']) - big['bn_var']).max()
  assert var_gap > 0.01, var_gap  # the big batch's variance is larger: not equal
  last_gap = np.abs(np.asarray(got['last_mean']) - big['bn_mean']).max()
  assert last_gap > 0.01, last_gap


def test_an_unweighted_mean_of_micro_batch_means_would_be_caught():
  params, batch, state = init_params(), make_batch(), init_state()
  _, metrics = accumjax.accumulate_gradients(bn_loss, params, batch, num_microbatches=K,
                                             model_state=state, state_rules=RULES)
  x, mask = np.asarray(batch['x']), np.asarray(batch['mask'])
  mus = [_np_stats(params, x[g], mask[g])[0] for g in micro_groups()]
  unweighted = (1 - MOMENTUM) * np.mean(mus, 0)
  assert np.abs(np.asarray(metrics['model_state']['bn_mean']) - unweighted).max() > 0.01


@pytest.mark.parametrize('mode', list(MODES))
def test_every_mode_commits_the_rules_result_once_per_update(mode):
  """Three updates; after each, the model state is the rules' result from the rows with the
  params of that update, and the params follow the accumulated (ghost-BN) gradient."""
  batches = [make_batch(seed) for seed in range(3)]
  history = _run(mode, batches)
  for batch, (before, after, metrics) in zip(batches, history, strict=True):
    assert bool(metrics['updated'])
    want, _ = expected_state(before.params, batch, before.model_state, micro_groups())
    chex.assert_trees_all_close(after.model_state, want, rtol=2e-5, atol=1e-5)
    # The gradient: micro-batch loss sums through their own statistics, divided once.
    loss_sum = lambda p, mb, s=before.model_state: bn_loss(p, mb, None, s)[0][0]  # noqa: E731
    grads = [jax.grad(loss_sum)(before.params, jax.tree.map(lambda x, g=g: x[g], batch))
             for g in micro_groups()]
    real = float(np.sum(batch['mask']))
    total = jax.tree.map(lambda *g, n=real: sum(g) / n, *grads)
    chex.assert_trees_all_close(
        after.params, jax.tree.map(lambda p, g: p - 0.5 * g, before.params, total),
        rtol=1e-5, atol=1e-6)


def test_modes_agree_and_interim_calls_do_not_commit():
  batches = [make_batch(seed) for seed in range(2)]
  runs = {mode: _run(mode, batches) for mode in MODES}
  for mode in ('multisteps', 'hybrid'):
    chex.assert_trees_all_close(runs[mode][-1][1].model_state, runs['scan'][-1][1].model_state,
                                rtol=1e-5, atol=1e-6)
  # One call into a multisteps cycle: the state of record is still the cycle's start.
  config = _config('multisteps')
  tx = accumjax.accumulating_optimizer(optax.sgd(0.5), config)
  state = accumjax.init_train_state(init_params(), tx, 0, config, model_state=init_state(),
                                    state_rules=RULES)
  step = accumjax.jit_train_step(accumjax.make_train_step(bn_loss, tx, config, state_rules=RULES),
                                 donate=False)
  first = loop.split_calls(make_batch(), config)[0]
  mid, _ = step(state, first)
  chex.assert_trees_all_equal(mid.model_state, state.model_state)
  assert float(mid.cycle.model_acc.weight) == 8.0 and float(mid.cycle.model_acc.count) == 1.0


def test_flush_commits_a_cycle_cut_short():
  config = _config('multisteps')
  tx = accumjax.accumulating_optimizer(optax.sgd(0.5), config)
  params, state0 = init_params(), init_state()
  state = accumjax.init_train_state(params, tx, 0, config, model_state=state0, state_rules=RULES)
  step = accumjax.jit_train_step(accumjax.make_train_step(bn_loss, tx, config, state_rules=RULES),
                                 donate=False)
  batch = make_batch()
  for call in loop.split_calls(batch, config)[:2]:
    state, _ = step(state, call)
  state, metrics = jax.jit(accumjax.make_flush(tx, config, state_rules=RULES))(state)
  assert bool(metrics['updated'])
  first_half = jax.tree.map(lambda x: x[:ROWS // 2], batch)
  want, _ = expected_state(params, first_half, state0, micro_groups(2, ROWS // 2))
  chex.assert_trees_all_close(state.model_state, want, rtol=2e-5, atol=1e-5)


def _nan_batch(j):
  batch = make_batch()
  b = ROWS // K
  x = np.asarray(batch['x']).copy()
  x[j * b] = np.nan
  return dict(batch, x=jnp.asarray(x))


@pytest.mark.parametrize('mode', list(MODES))
def test_a_non_finite_micro_batch_proposes_nothing(mode):
  batch = _nan_batch(1)
  history = _run(mode, [batch], nonfinite='skip_microbatch')
  before, after, metrics = history[0]
  assert float(metrics['nonfinite']) == 1.0 and not bool(metrics['skipped'])
  groups = [g for j, g in enumerate(micro_groups()) if j != 1]
  want, _ = expected_state(before.params, batch, before.model_state, groups)
  want['seen'] = 8 + 2 + 7  # the rows of the other three
  x = np.asarray(batch['x'])
  want['amax'] = float(np.abs(np.concatenate([x[g][np.asarray(batch['mask'])[g] > 0]
                                              for g in groups])).max())
  chex.assert_trees_all_close(after.model_state, want, rtol=2e-5, atol=1e-5)


def test_a_skipped_update_leaves_the_state_as_it_was():
  history = _run('hybrid', [_nan_batch(2), make_batch(1)], nonfinite='skip_update')
  (before, after, metrics), (_, after2, _) = history
  assert bool(metrics['skipped'])
  chex.assert_trees_all_equal(after.model_state, before.model_state)
  want, _ = expected_state(after.params, make_batch(1), after.model_state, micro_groups())
  chex.assert_trees_all_close(after2.model_state, want, rtol=2e-5, atol=1e-5)


def test_bad_rules_and_mismatches_are_config_errors():
  params, batch, state = init_params(), make_batch(), init_state()
  with pytest.raises(accumjax.ConfigError, match=r"\['bn_var'\] = 'avg'; allowed"):
    accumjax.accumulate_gradients(bn_loss, params, batch, num_microbatches=K, model_state=state,
                                  state_rules=dict(RULES, bn_var='avg'))
  with pytest.raises(accumjax.ConfigError, match='needs state_rules'):
    accumjax.accumulate_gradients(bn_loss, params, batch, num_microbatches=K, model_state=state)
  with pytest.raises(accumjax.ConfigError, match='structures differ'):
    accumjax.accumulate_gradients(bn_loss, params, batch, num_microbatches=K, model_state=state,
                                  state_rules={'bn_mean': 'mean'})
  config = _config('scan')
  tx = accumjax.accumulating_optimizer(optax.sgd(0.1), config)
  plain = accumjax.init_train_state(params, tx, 0, config)
  with pytest.raises(accumjax.ConfigError, match='disagree about the model state'):
    accumjax.make_train_step(bn_loss, tx, config, state_rules=RULES)(plain, batch)
  with pytest.raises(accumjax.ConfigError, match="state_rules='first'"):
    accumjax.make_train_step(bn_loss, tx, config, state_rules='first')
  with pytest.raises(accumjax.ConfigError, match='model_state and state_rules together'):
    accumjax.init_train_state(params, tx, 0, config, model_state=state)


def test_mid_cycle_checkpoint_restores_the_accumulator(tmp_path):
  config = _config('multisteps')
  tx = accumjax.accumulating_optimizer(optax.sgd(0.5), config)
  fresh = lambda: accumjax.init_train_state(init_params(), tx, 0, config,  # noqa: E731
                                            model_state=init_state(), state_rules=RULES)
  step = accumjax.jit_train_step(accumjax.make_train_step(bn_loss, tx, config, state_rules=RULES),
                                 donate=False)
  calls = loop.split_calls(make_batch(), config)
  state = fresh()
  for call in calls[:2]:
    state, _ = step(state, call)
  ckpt = checkpoint.Checkpointer(tmp_path / 'ckpt', async_save=False)
  ckpt.save(state, {'note': 'mid-cycle'})
  restored = ckpt.restore(lambda meta: checkpoint.abstract_like(fresh())).state
  chex.assert_trees_all_equal(restored, state)
  for call in calls[2:]:
    state, _ = step(state, call)
    restored, _ = step(restored, call)
  chex.assert_trees_all_equal(restored.model_state, state.model_state)


@pytest.fixture(scope='module')
def dp():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-m', 'tests.test_model_state'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_four_devices_give_the_big_batch_state_where_the_rules_promise_it(dp):
  """On 4 devices x K micro-batches the groups differ from one device's K, yet 'mean' (running
  mean), 'sum' and 'max' give the big batch's values: the accumulators meet in one reduction."""
  assert dp['devices'] == 4
  for mode in MODES:
    assert dp['errors'][mode] <= 2e-5, dp['errors']
  assert 'has no big-batch meaning across devices' in dp['last_error']


def _dp_main():
  from accumjax import parallel
  batch = make_batch()
  errors = {}
  for mode in MODES:
    config = _config(mode, devices=4)
    mesh = parallel.make_mesh(4)
    tx = accumjax.accumulating_optimizer(optax.sgd(0.5), config)
    state = parallel.replicate(accumjax.init_train_state(
        init_params(), tx, 0, config, model_state=init_state(DP_RULES), state_rules=DP_RULES),
        mesh)
    step = accumjax.jit_train_step(
        accumjax.make_train_step(bn_loss, tx, config, mesh=mesh, state_rules=DP_RULES),
        donate=False)
    before = state
    calls = [parallel.shard_batch(c, mesh) for c in loop.split_calls(batch, config)]
    state = loop.run_update(step, state, calls, config).state
    _, big = expected_state(jax.device_get(before.params), batch, init_state(DP_RULES),
                            micro_groups())
    got = jax.device_get(state.model_state)
    errors[mode] = max(
        float(np.abs(got['bn_mean'] - big['bn_mean']).max()),
        abs(int(got['seen']) - 22),
        abs(float(got['amax']) - float(np.abs(np.asarray(batch['x'])[
            np.asarray(batch['mask']) > 0]).max())))
  config = _config('scan', devices=4)
  mesh = parallel.make_mesh(4)
  tx = accumjax.accumulating_optimizer(optax.sgd(0.5), config)
  state = parallel.replicate(accumjax.init_train_state(
      init_params(), tx, 0, config, model_state=init_state(), state_rules=RULES), mesh)
  step = jax.jit(accumjax.make_train_step(bn_loss, tx, config, mesh=mesh, state_rules=RULES))
  try:
    step(state, parallel.shard_batch(batch, mesh))
    last_error = ''
  except accumjax.ConfigError as e:
    last_error = str(e)
  print(json.dumps({'devices': jax.device_count(), 'errors': errors, 'last_error': last_error}))


if __name__ == '__main__':
  _dp_main()
