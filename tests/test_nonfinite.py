"""Non-finite micro-batches never poison the state: every mode x fault x micro-batch position
under skip_update, skip_microbatch against the big batch of the remaining data, the counters,
checkpoints after a skip, and float16 dynamic loss scaling."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accumjax
from accumjax import checkpoint
from accumjax.lm.train import train_and_evaluate
from experiments import train as train_cli
from tests import reference
from tests.helpers import calls_of, lm_loss, train_config
from tests.test_equivalence import ROWS, TOL, adamw, config_for, sgd

K = 4
MODES = [('scan', 'lazy'), ('multisteps', 'lazy'), ('multisteps', 'optax'), ('hybrid', 'lazy')]


def faulty_loss(params, batch, rng):
  """lm_loss times the mean of the micro-batch's `fault` rows (1.0, nan, inf or a factor)."""
  loss_sum, weight = lm_loss(params, batch, rng)
  return loss_sum * jnp.mean(batch['fault']), weight


def with_fault(batch, j=None, value=1.0, k=K):
  """`batch` with a `fault` row field: `value` on the rows of micro-batch j, 1.0 elsewhere."""
  fault = np.ones(ROWS, np.float32)
  if j is not None:
    b = ROWS // k
    fault[j * b:(j + 1) * b] = value
  return dict(batch, fault=jnp.asarray(fault))


def without_microbatch(batch, j, k=K):
  keep = np.ones(ROWS, bool)
  keep[j * (ROWS // k):(j + 1) * (ROWS // k)] = False
  return jax.tree.map(lambda x: x[keep], batch)


@functools.cache
def _reference_without(skipped):
  """The plain full-batch reference on the 3 test batches but `skipped` (shared by modes):
  adamw over whole batches without batch `skipped`; sgd over one batch without micro-batch
  `skipped`."""
  params, raw = reference.init_params(), reference.make_batches(3, ROWS)
  if skipped == 'batch 1':
    return reference.run_reference(params, [raw[0], raw[2]], adamw())
  return reference.run_reference(params, [without_microbatch(raw[0], skipped)], sgd())


def _stepper(config, opt):
  tx = accumjax.accumulating_optimizer(opt, config)
  step = accumjax.jit_train_step(accumjax.make_train_step(faulty_loss, tx, config),
                                 donate=False)

  def run_update(state, batch):
    done = accumjax.run_update(step, state, calls_of(batch, config), config)
    assert done.complete and bool(done.metrics['updated'])
    return done.state, done.metrics

  return tx, run_update


def _optimizer_state(opt_state):
  """What an update may change: the inner state and accumulator (MultiSteps' own counters
  advance on every call, skipped updates included, which keeps the cycle aligned)."""
  if isinstance(opt_state, optax.MultiStepsState):
    return opt_state.inner_opt_state, opt_state.acc_grads, opt_state.mini_step
  return opt_state


def _first(state) -> int:
  """The cycle's first non-finite micro-batch (-1: none, or no cycle kept: scan mode)."""
  return -1 if state.cycle is None else int(state.cycle.first_nonfinite)


def _position(state) -> int:
  return 0 if state.cycle is None else int(state.cycle.microbatches)


@pytest.mark.parametrize('mode,impl', MODES)
def test_skip_update_leaves_state_bit_identical_for_every_fault_position(tmp_path, mode, impl):
  config = config_for(mode, K, multisteps_impl=impl)
  params = reference.init_params()
  raw = reference.make_batches(3, ROWS)
  tx, run_update = _stepper(config, adamw())
  s1, _ = run_update(accumjax.init_train_state(params, tx, 0), with_fault(raw[0]))
  # Skipping update 2 is training on updates 1 and 3 alone, with update 3 in its own cycle.
  ref, _ = _reference_without('batch 1')
  for value in (np.nan, np.inf):
    for j in range(K):
      s2, m2 = run_update(s1, with_fault(raw[1], j, value))
      chex.assert_trees_all_equal(s2.params, s1.params)
      chex.assert_trees_all_equal(_optimizer_state(s2.opt_state), _optimizer_state(s1.opt_state))
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(s2.opt_state))
      assert bool(m2['skipped']) and int(m2['nonfinite']) == 1, (value, j)
      assert int(m2['first_nonfinite']) == j
      assert (int(s2.skipped_updates), int(s2.consecutive_skips),
              int(s2.nonfinite_microbatches), _first(s2)) == (1, 1, 1, -1)
      assert int(s2.update_step) == 2 and _position(s2) == 0  # cycle aligned
      s3, m3 = run_update(s2, with_fault(raw[2]))
      assert not bool(m3['skipped']) and np.isfinite(float(m3['loss']))
      chex.assert_trees_all_close(s3.params, ref, rtol=TOL, atol=1e-6)
      assert (int(s3.skipped_updates), int(s3.consecutive_skips)) == (1, 0)
  # A checkpoint taken right after the skip resumes bit-identically.
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(s2, {})
  ckpt.wait()
  restored = checkpoint.Checkpointer(tmp_path).restore(
      lambda meta: accumjax.init_train_state(params, tx, 0)).state
  chex.assert_trees_all_equal(restored, s2)
  chex.assert_trees_all_equal(run_update(restored, with_fault(raw[2]))[0], s3)


@pytest.mark.parametrize('mode', ['hybrid'])  # LazyMultiSteps across calls, scan within one
def test_mid_cycle_checkpoint_keeps_the_fault(tmp_path, mode):
  # Saved after the bad micro-batch but before the cycle ends: the restored run still skips
  # the update and still knows which micro-batch was bad.
  config = config_for(mode, K)
  tx = accumjax.accumulating_optimizer(sgd(), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(faulty_loss, tx, config))
  calls = calls_of(with_fault(reference.make_batches(1, ROWS)[0], 0, np.nan), config)
  state = step(accumjax.init_train_state(reference.init_params(), tx, 0), calls[0])[0]
  assert _first(state) == 0 and int(state.cycle.sums.nonfinite) == 1
  # The accumulator saved mid-cycle holds no NaN: the bad micro-batch was never added.
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.opt_state))
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(state, {})
  ckpt.wait()
  state = checkpoint.Checkpointer(tmp_path).restore(
      lambda meta: accumjax.init_train_state(reference.init_params(), tx, 0)).state
  for call in calls[1:]:
    state, metrics = step(state, call)
  assert bool(metrics['skipped']) and int(metrics['first_nonfinite']) == 0
  chex.assert_trees_all_equal(state.params, reference.init_params())


# scan: the masking inside one scan; multisteps: masked sums carried across calls by MultiSteps.
@pytest.mark.parametrize('mode', ['scan', 'multisteps'])
def test_skip_microbatch_equals_big_batch_of_the_remaining_data(mode):
  config = config_for(mode, K, nonfinite='skip_microbatch')
  params = reference.init_params()
  batch = reference.make_batches(3, ROWS)[0]  # the batch _reference_without uses
  tx, run_update = _stepper(config, sgd())
  fresh = accumjax.init_train_state(params, tx, 0)
  for j, value in enumerate([np.nan, np.inf, -np.inf, np.nan]):
    state, metrics = run_update(fresh, with_fault(batch, j, value))
    ref, ref_losses = _reference_without(j)
    chex.assert_trees_all_close(state.params, ref, rtol=TOL, atol=1e-6)
    np.testing.assert_allclose(float(metrics['loss']), ref_losses[0], rtol=TOL)
    assert not bool(metrics['skipped'])
    assert (int(state.skipped_updates), int(state.nonfinite_microbatches)) == (0, 1)
  # The renormalisation matters: the full batch's update is another one.
  full, _ = reference.run_reference(params, [batch], sgd())
  assert reference.rel_err(state.params, full) > 100 * TOL
  # Nothing left: the update is skipped (and counted), never 0/0.
  all_bad = dict(batch, fault=jnp.full((ROWS,), jnp.nan))
  state, metrics = run_update(fresh, all_bad)
  assert bool(metrics['skipped']) and int(state.skipped_updates) == 1
  chex.assert_trees_all_equal(state.params, params)


def test_core_masks_and_counts_without_any_nan_in_the_sums():
  params = reference.init_params()
  batch = with_fault(reference.make_batches(1, ROWS)[0], 2, np.inf)
  sums, _, bad, _ = accumjax.core.scan_microbatches(faulty_loss, params, batch,
                                                     num_microbatches=K)
  assert bad.tolist() == [False, False, True, False] and float(sums.nonfinite) == 1.0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(sums))
  grads, m = accumjax.accumulate_gradients(faulty_loss, params, batch, num_microbatches=K)
  ref = jax.grad(reference.full_batch_loss)(params, without_microbatch(batch, 2))
  chex.assert_trees_all_close(grads, ref, rtol=TOL, atol=1e-7)
  assert float(m['nonfinite']) == 1.0


# --- float16 with dynamic loss scaling ------------------------------------------------------

def test_fp16_unscales_adjusts_the_scale_once_per_update_and_skips_overflow():
  params = reference.init_params()
  raw = reference.make_batches(4, ROWS)
  results = {}
  for scale in (2.0 ** 4, 2.0 ** 10):
    config = config_for('hybrid', K, compute_dtype='float16', initial_loss_scale=scale,
                        loss_scale_growth_interval=2)
    tx, run_update = _stepper(config, sgd())
    state = accumjax.init_train_state(params, tx, 0, config)
    assert float(state.loss_scale) == scale
    scales = []
    for batch in raw[:3]:
      state, metrics = run_update(state, with_fault(batch))
      scales.append(float(state.loss_scale))
      assert not bool(metrics['skipped'])
    assert scales == [scale, 2 * scale, 2 * scale]  # doubled after 2 good updates
    results[scale] = state
  # Micro-batch gradients are unscaled before they are summed: the scale does not change the
  # result beyond float16 rounding, and both follow the float32 reference.
  ref, _ = reference.run_reference(params, raw[:3], sgd())
  for state in results.values():
    assert reference.rel_err(state.params, ref) < 1e-2
  chex.assert_trees_all_close(results[16.0].params, results[1024.0].params, rtol=2e-2,
                              atol=2e-3)
  # 1e6 x the loss is finite in float32, but its scaled gradient overflows float16: that
  # update alone is skipped and the scale halves; the next one applies again.
  state = results[1024.0]
  after, metrics = run_update(state, with_fault(raw[3], 1, 1e6))
  assert bool(metrics['skipped']) and int(metrics['first_nonfinite']) == 1
  assert float(after.loss_scale) == float(state.loss_scale) / 2
  chex.assert_trees_all_equal(after.params, state.params)
  after, metrics = run_update(after, with_fault(raw[3]))
  assert not bool(metrics['skipped']) and int(after.skipped_updates) == 1
  # The same factor in float32 is no fault at all.
  config32 = config_for('hybrid', K)
  tx32, run32 = _stepper(config32, sgd())
  _, m32 = run32(accumjax.init_train_state(params, tx32, 0), with_fault(raw[3], 1, 1e6))
  assert not bool(m32['skipped']) and int(m32['nonfinite']) == 0


def test_bad_fault_settings_raise():
  with pytest.raises(accumjax.ConfigError, match="nonfinite='ignore'; allowed: skip_update"):
    accumjax.AccumConfig(num_microbatches=2, microbatch_size=2, nonfinite='ignore')
  with pytest.raises(accumjax.ConfigError, match='initial_loss_scale=0.5 must be'):
    accumjax.AccumConfig(num_microbatches=2, microbatch_size=2, initial_loss_scale=0.5)
  with pytest.raises(accumjax.ConfigError, match='loss_scale_growth_interval=0'):
    accumjax.AccumConfig(num_microbatches=2, microbatch_size=2, loss_scale_growth_interval=0)


# --- the training loop: counters, log line, raise, consecutive skips, resume ----------------

TINY = dict(seq_len=32, batch_size=4, d_model=32, num_layers=1, num_heads=2, max_len=64,
            eval_batches=1, log_every=1, warmup_steps=2, eval_every=100, lr=1e-2,
            grad_accum_steps=4, save_every=0)
FP16_TOL = 1e-3  # measured 7.8e-5 over 10 updates (docs/reliability.md, benchmarks/faults.md)


def _train(out, corpus, **kw):
  summary = train_and_evaluate(train_config(**{**TINY, 'data': corpus, **kw}), out)
  lines = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  return summary, [r for r in lines if r['kind'] == 'train']


def test_fp16_main_model_matches_fp32_and_an_overflow_skips_only_that_update(
    tmp_path, corpus, capsys):
  # Update 4 gets x1e6 on micro-batch 1 in float16 (finite in float32, an overflow once
  # scaled) and NaN in float32: both runs must skip exactly that update, so they follow the
  # same trajectory and their losses agree to float16 rounding at every update.
  _, fp32 = _train(tmp_path / 'fp32', corpus, steps=6, accum_mode='hybrid',
                   inject_faults='4:1:nan')
  summary, fp16 = _train(tmp_path / 'fp16', corpus, steps=6, accum_mode='hybrid',
                         precision='fp16', inject_faults='4:1:1e6')
  applied = [0, 1, 2, 4, 5]
  losses32, losses16 = (np.array([x[i]['loss'] for i in applied]) for x in (fp32, fp16))
  np.testing.assert_allclose(losses16, losses32, rtol=FP16_TOL)
  assert not np.array_equal(losses16, losses32)  # it really computed in float16
  for run in (fp32, fp16):
    assert [r['skipped'] for r in run] == [False, False, False, True, False, False]
    assert (run[3]['nonfinite'], run[3]['first_nonfinite']) == (1, 1)
    # The schedule counts applied updates: update 5 uses the lr update 4 would have used.
    assert run[2]['lr'] != run[3]['lr'] == run[4]['lr'] != run[5]['lr'], run
  assert [r['loss_scale'] for r in fp16] == [2.0 ** 15] * 4 + [2.0 ** 14] * 2
  assert [r['loss_scale'] for r in fp32] == [1.0] * 6
  assert (summary['skipped_updates'], summary['nonfinite_microbatches']) == (1, 1)
  text = capsys.readouterr().out
  assert 'update [4/6] loss' in text and 'skipped 1 nonfinite 1 scale 16384' in text


@pytest.mark.parametrize('argv,message', [
    (['--nonfinite-policy', 'raise', '--inject-faults', '2:3:inf'],
     'non-finite loss or gradient in micro-batch 3 (counting from 0, of 4) of update 2'),
    (['--inject-faults', '2:0,3:2:inf', '--max-consecutive-skips', '2'],
     '2 updates in a row skipped for non-finite values (updates 2-3, --max-consecutive-skips 2)'),
])
def test_the_loop_stops_with_one_clear_line(tmp_path, corpus, capsys, argv, message):
  out = tmp_path / 'run'
  rc = train_cli.main([
      '--data', corpus, '--seq-len', '32', '--batch-size', '4', '--grad-accum-steps', '4',
      '--d-model', '32', '--layers', '1', '--heads', '2', '--max-len', '64', '--steps', '4',
      '--eval-batches', '1', '--accum-mode', 'multisteps', '--save-every', '1', *argv,
      '--out', str(out)])
  err = capsys.readouterr().err
  assert rc == 1
  assert message in err and len(err.strip().splitlines()) == 1, err
  assert 'the newest checkpoint is step' in err
  records = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  assert records[-1]['skipped'] and records[-1]['nonfinite'] == 1


@pytest.mark.slow  # ~30 s; the same resume at the API level is in the skip_update test
def test_preempted_after_a_skip_resumes_bit_identically(tmp_path, corpus):
  kw = dict(steps=4, accum_mode='multisteps', inject_faults='2:1:nan', save_every=1)
  straight, records = _train(tmp_path / 'straight', corpus, **kw)
  assert [r['skipped'] for r in records] == [False, True, False, False]
  cfg = train_config(**{**TINY, 'data': corpus, **kw})
  polls = iter(range(1, 100))
  stopped = train_and_evaluate(cfg, tmp_path / 'cut', should_stop=lambda: next(polls) == 10)
  assert stopped['preempted'] and stopped['update'] == 2  # mid-cycle, after the skip
  resumed = train_and_evaluate(cfg, tmp_path / 'cut', resume=True)
  assert resumed['params_fingerprint'] == straight['params_fingerprint']
  assert (resumed['skipped_updates'], resumed['nonfinite_microbatches']) == (1, 1)


@pytest.mark.parametrize('argv,message', [
    (['--nonfinite-policy', 'ignore'], "invalid choice: 'ignore'"),
    (['--max-consecutive-skips', '-1'], '--max-consecutive-skips -1 must be an integer >= 0'),
    (['--inject-faults', '2'], "--inject-faults '2': '2' is not UPDATE:MICROBATCH[:VALUE]"),
    (['--inject-faults', '2:4'], "'2:4' needs UPDATE >= 1 and 0 <= MICROBATCH < 4 (K)"),
])
def test_bad_fault_flags_fail_with_one_line_before_writing(tmp_path, capsys, argv, message):
  out = tmp_path / 'never'
  try:
    rc = train_cli.main([*argv, '--out', str(out)])
  except SystemExit as e:
    rc = e.code
  err = capsys.readouterr().err
  assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
  assert not out.exists()


@pytest.mark.slow  # ~45 s: it compiles the step for every mode x policy
def test_faults_experiment_quick_table(tmp_path):
  from experiments import faults
  out = tmp_path / 'faults.md'
  assert faults.main(['--quick', '--out', str(out)]) == 0
  text = out.read_text()
  rows = [line for line in text.splitlines() if line.startswith(('| scan', '| multi', '| hyb'))]
  assert len(rows) == 18
  skipping = [r for r in rows if 'skip_microbatch' not in r]
  assert all('yes (bitwise)' in r and '| 0.0e+00 |' in r for r in skipping)
  assert all('| (0, 1) |' in r for r in rows if 'skip_microbatch' in r)
  assert '| MultiSteps(adamw), no skip fn | nan | NaN | **no** |' in text
  assert 'micro-batch 1 (counting from 0, of 4) of update 2' in text


@pytest.mark.parametrize('mode', ['scan', 'multisteps'])
def test_a_negative_weight_is_a_bad_microbatch_not_a_silent_subtraction(mode):
  # A weight counts tokens or examples: a negative one would flip that micro-batch's gradient
  # and shrink the divisor without any error. It is masked and counted like a NaN.
  def signed_loss(params, batch, rng):
    loss_sum, weight = lm_loss(params, batch, rng)
    return loss_sum, weight * jnp.mean(batch['fault'])

  config = config_for(mode, K, nonfinite='skip_microbatch')
  params = reference.init_params()
  batch = with_fault(reference.make_batches(3, ROWS)[0], 2, -1.0)
  tx = accumjax.accumulating_optimizer(sgd(), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(signed_loss, tx, config))
  done = accumjax.run_update(step, accumjax.init_train_state(params, tx, 0),
                             calls_of(batch, config), config)
  assert int(done.metrics['nonfinite']) == 1 and int(done.metrics['first_nonfinite']) == 2
  ref, _ = _reference_without(2)
  chex.assert_trees_all_close(done.state.params, ref, rtol=TOL, atol=1e-6)
