"""K that changes between updates: every update is the big batch of its own micro-batches, the
learning rate follows K when asked, scan mode compiles one program per K, a run killed
mid-ramp resumes bit-identically, and auto K follows B_simple without flapping."""

import chex
import jax
import optax
import pytest

import accumjax
from accumjax import schedules
from accumjax.core import ConfigError
from tests import reference
from tests.helpers import calls_of, lm_loss
from tests.test_equivalence import TOL

ROWS_PER_MB = 4
KS = (2, 4, 1, 8)  # one update each


def _batches():
  return [reference.make_batches(1, k * ROWS_PER_MB, seed=i)[0] for i, k in enumerate(KS)]


@pytest.mark.parametrize('mode,c', [('scan', None), ('multisteps', None), ('hybrid', 1)])
@pytest.mark.parametrize('scaling', [pytest.param('none', marks=pytest.mark.slow), 'sqrt',
                                     pytest.param('linear', marks=pytest.mark.slow)])
def test_each_update_is_the_big_batch_of_its_own_k(mode, c, scaling):
  """Against plain full-batch SGD on each update's whole batch, with the learning rate
  multiplied by (K / 2) ** p in the reference itself."""
  config = accumjax.AccumConfig(num_microbatches=max(KS), microbatch_size=ROWS_PER_MB,
                                mode=mode, microbatches_per_call=c, lr_batch_scaling=scaling,
                                base_num_microbatches=2)
  tx = accumjax.accumulating_optimizer(optax.sgd(0.3), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config))
  state = accumjax.init_train_state(reference.init_params(), tx, 0, config)
  params = reference.init_params()
  power = {'none': 0.0, 'sqrt': 0.5, 'linear': 1.0}[scaling]
  for batch, k in zip(_batches(), KS, strict=True):
    calls = calls_of(batch, config) if mode != 'scan' else [batch]
    done = accumjax.run_update(step, state, calls, config, num_microbatches=k)
    assert done.complete and bool(done.metrics['updated'])
    state = done.state
    grads = jax.grad(reference.full_batch_loss)(params, batch)
    params = jax.tree.map(lambda p, g, k=k: p - 0.3 * (k / 2) ** power * g, params, grads)
    chex.assert_trees_all_close(state.params, params, rtol=TOL, atol=1e-6)
    assert (0 if state.cycle is None else int(state.cycle.microbatches)) == 0
  if mode == 'scan':
    assert step._cache_size() == len(set(KS))  # one program per distinct K


def test_mean_of_k_changes_would_be_caught():
  """Guard: the K=8 update after a K=1 update differs from a K=1-sized update on its batch."""
  b = _batches()
  g8 = jax.grad(reference.full_batch_loss)(reference.init_params(), b[3])
  g1 = jax.grad(reference.full_batch_loss)(
      reference.init_params(), jax.tree.map(lambda x: x[:ROWS_PER_MB], b[3]))
  assert reference.rel_err(g1, g8) > 100 * TOL


def test_lazy_multisteps_on_its_own_follows_a_schedule_function():
  """LazyMultiSteps in a user's own optax loop (no train step): a callable every_k_schedule
  from `KSchedule.every_k` ends each cycle after that update's K calls, and each update is the
  big batch of its own micro-batches."""
  sched = schedules.parse_k_schedule('0:2,1:4,2:1')
  tx = accumjax.LazyMultiSteps(accumjax.normalized(optax.sgd(0.3)),
                               every_k_schedule=sched.every_k(1), use_grad_mean=False)
  params = ref = reference.init_params()
  opt_state = tx.init(accumjax.as_opt_params(params))
  update = jax.jit(lambda g, s, p: tx.update(g, s, accumjax.as_opt_params(p)))
  for u, k in enumerate((2, 4, 1)):
    batch = reference.make_batches(1, k * ROWS_PER_MB, seed=u)[0]
    for i in range(k):
      mb = jax.tree.map(lambda x, i=i: x[i * ROWS_PER_MB:(i + 1) * ROWS_PER_MB], batch)
      sums, _ = accumjax.accumulate_sums(lm_loss, params, mb, num_microbatches=1)
      updates, opt_state = update(sums, opt_state, params)
      assert bool(tx.has_updated(opt_state)) == (i == k - 1)
      params = optax.apply_updates(params, updates.grads)
    grads = jax.grad(reference.full_batch_loss)(ref, batch)
    ref = jax.tree.map(lambda p, g: p - 0.3 * g, ref, grads)
    chex.assert_trees_all_close(params, ref, rtol=TOL, atol=1e-6)


def test_schedule_parsing_and_errors():
  s = schedules.parse_k_schedule('0:2, 200:4,400:8')
  assert [s.at(u) for u in (0, 199, 200, 399, 400, 10**6)] == [2, 2, 4, 4, 8, 8]
  assert s.max_k == 8 and s.ks == (2, 4, 8) and str(s) == '0:2,200:4,400:8'
  for bad, match in (('', 'allowed'), ('5:2', 'start at update 0'), ('0:2,0:4', 'increase'),
                     ('0:2,x:4', 'is not U:K'), ('0:0', 'K must be >= 1'), ('0:2;1:4', 'U:K')):
    with pytest.raises(ConfigError, match=match):
      schedules.parse_k_schedule(bad)


def test_auto_k_has_hysteresis_and_ignores_bad_estimates():
  allowed = (2, 4, 8, 16, 32)
  # target = B_simple / tokens per micro-batch (here 100 tokens)
  assert schedules.auto_k(790, 100, 4, allowed) == 4  # 7.9 < 2 x 4: stay
  assert schedules.auto_k(800, 100, 4, allowed) == 8  # 8 >= 2 x 4: move to the nearest
  assert schedules.auto_k(700, 100, 8, allowed) == 8  # back below 8 but >= 4: stay (no flap)
  assert schedules.auto_k(250, 100, 8, allowed) == 2  # 2.5 < 4: nearest on a log scale
  assert schedules.auto_k(10**6, 100, 8, allowed) == 32  # capped at the largest
  for bad in (float('nan'), -5.0, 0.0, float('inf')):
    assert schedules.auto_k(bad, 100, 8, allowed) == 8


def test_trainer_flags_are_checked_before_anything_runs():
  from accumjax.lm import config as lm_config
  from tests.helpers import train_config
  for flat, match in (
      (dict(grad_accum_schedule='0:2,10:4', grad_accum_steps=4), 'not several'),
      (dict(grad_accum_schedule='0:2,10:3', accum_mode='hybrid', microbatches_per_call=2),
       'must divide every K'),
      (dict(grad_accum_schedule='0:2,10:4', accum_mode='multisteps', multisteps_impl='optax'),
       'multisteps-impl lazy'),
      (dict(grad_accum_steps='auto', noise_stats=False), 'needs --noise-stats'),
      (dict(grad_accum_steps='auto', max_grad_accum_steps=1), 'max-grad-accum-steps'),
      (dict(lr_batch_scaling='cubic'), 'lr-batch-scaling'),
  ):
    with pytest.raises(ConfigError, match=match):
      lm_config.validate(train_config(**flat))
  accum = lm_config.validate(train_config(grad_accum_schedule='0:2,10:6', accum_mode='hybrid'))
  assert accum.num_microbatches == 6 and accum.per_call == 2 and accum.base_k == 2


def _run(tmp_path, corpus, name, stop_at_call=None, resume=None, **flat):
  import itertools

  from accumjax.lm.train import train_and_evaluate
  from tests.helpers import train_config
  from tests.test_train import TINY, _records
  cfg = train_config(**{**TINY, 'data': str(corpus), 'steps': 12, 'eval_every': 100,
                        'save_every': 100, 'lr': 1e-2, 'accum_mode': 'multisteps', **flat})
  counter = itertools.count(1)
  stop = (lambda: next(counter) == stop_at_call) if stop_at_call else (lambda: False)
  summary = train_and_evaluate(cfg, tmp_path / name, resume=resume, should_stop=stop)
  return summary, _records(tmp_path / name)


@pytest.mark.slow  # ~25 s each
@pytest.mark.parametrize('plan', ['schedule', 'auto'])
def test_a_run_stopped_mid_ramp_mid_cycle_resumes_bit_identically(tmp_path, corpus, plan,
                                                                  monkeypatch):
  from accumjax.lm import config as lm_config
  monkeypatch.setattr(lm_config, 'AUTO_MIN_DWELL', 2)
  flat = dict(grad_accum_schedule='0:2,3:4,6:8', lr_batch_scaling='sqrt') if plan == 'schedule' \
      else dict(grad_accum_steps='auto', max_grad_accum_steps=8, batch_size=1, seq_len=8)
  straight, (records, _, _) = _run(tmp_path, corpus, 'straight', **flat)
  ks = [r['k'] for r in records]
  assert len(set(ks)) > 1, ks  # K did change during the run
  if plan == 'schedule':
    assert ks == [2] * 3 + [4] * 3 + [8] * 6
    assert records[3]['lr'] / records[2]['lr'] > 1.2  # sqrt(4/2) on top of the warmup
  # stop in the middle of the first update with the largest K (calls counted from the start)
  first = ks.index(max(ks))
  stop_at = sum(ks[:first]) + max(ks) // 2
  stopped, _ = _run(tmp_path, corpus, 'cut', stop_at_call=stop_at, **flat)
  assert stopped.get('preempted'), stopped
  resumed, (again, _, _) = _run(tmp_path, corpus, 'cut', resume=True, **flat)
  assert resumed['params_fingerprint'] == straight['params_fingerprint']
  assert [r['k'] for r in again] == ks
  assert [r['loss'] for r in again] == [r['loss'] for r in records]
  # changing the plan under an update in progress is refused (the same largest K, so the
  # accumulation shape check alone would not see it)
  if plan == 'schedule':
    _run(tmp_path, corpus, 'cut2', stop_at_call=stop_at, **flat)
    with pytest.raises(ConfigError, match='started with K=8; the new K plan gives it K=4'):
      _run(tmp_path, corpus, 'cut2', resume=True,
           **dict(flat, grad_accum_schedule='0:2,3:4,6:4,9:8'))


def test_the_library_names_its_arguments_and_the_cli_its_flags():
  from accumjax.lm import build as lm_build
  from accumjax.lm import config as lm_config
  with pytest.raises(ConfigError) as lib:
    schedules.parse_k_schedule('5:2')
  assert "spec='5:2'" in str(lib.value) and '--' not in str(lib.value)
  with pytest.raises(ConfigError, match="--grad-accum-schedule '5:2' must start at update 0"):
    lm_config.validate(lm_config.from_flat({'grad_accum_schedule': '5:2'}))
  with pytest.raises(ConfigError) as lib:
    accumjax.parallel.make_mesh(data=2, fsdp=1)
  assert 'make_mesh(data=2)' in str(lib.value) and '--' not in str(lib.value).split('.')[0]
  with pytest.raises(ConfigError, match='--mesh data=2 needs 2 devices'):
    lm_build.make_mesh('data=2')
