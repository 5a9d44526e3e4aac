"""Orbax checkpoints: bit-identical resume at every position of a cycle, config checks on
resume, and corrupted / partial / unfinished checkpoints."""

import functools
import itertools
import json
import pathlib

import chex
import jax
import numpy as np
import pytest

import accumjax
from accumjax import checkpoint
from accumjax.lm.build import build_optimizer
from accumjax.lm.config import validate
from accumjax.lm.model import make_lm
from accumjax.lm.train import train_and_evaluate
from tests import reference
from tests.helpers import calls_of, lm_loss, train_config
from tests.test_equivalence import ROWS, adamw, config_for

MODES = ['scan', 'multisteps', 'hybrid']


def _calls(config, updates=3):
  return [c for b in reference.make_batches(updates, ROWS) for c in calls_of(b, config)]


@pytest.mark.parametrize('precision', ['float32', 'bfloat16'])
@pytest.mark.parametrize('mode', MODES)
def test_resume_at_every_position_of_a_cycle_is_bit_identical(tmp_path, mode, precision):
  config = config_for(mode, 4, compute_dtype=precision)
  tx = accumjax.accumulating_optimizer(adamw(), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config), donate=False)
  fresh = lambda: accumjax.init_train_state(reference.init_params(), tx, 0)
  calls = _calls(config)
  straight = [fresh()]
  for c in calls:
    straight.append(step(straight[-1], c)[0])
  # Stop after every call of the second update: its boundary and each mid-cycle position.
  first = config.calls_per_update
  for stop in range(first, 2 * first + 1):
    ckpt = checkpoint.Checkpointer(tmp_path / f'{stop}', keep=2)
    ckpt.save(straight[stop], {'stop': stop})
    ckpt.wait()
    ckpt.close()
    restored = checkpoint.Checkpointer(tmp_path / f'{stop}').restore(lambda meta: fresh())
    assert restored.meta['stop'] == stop and not restored.skipped
    state = restored.state
    assert type(state.opt_state) is type(fresh().opt_state)  # namedtuples stay namedtuples
    chex.assert_trees_all_equal(state, straight[stop])
    chex.assert_trees_all_equal_dtypes(state, fresh())
    for c in calls[stop:]:
      state = step(state, c)[0]
    chex.assert_trees_all_equal(state.params, straight[-1].params)
    chex.assert_trees_all_equal(state, straight[-1])
  # The comparison is not vacuous: a different RNG/data position changes the result.
  other = step(straight[first], calls[first + 1])[0]
  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(other, straight[first + 1])


def test_restore_under_x64_keeps_float32(tmp_path):
  config = config_for('multisteps', 4)
  tx = accumjax.accumulating_optimizer(adamw(), config)
  state = accumjax.init_train_state(reference.init_params(), tx, 0)
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(state, {})
  ckpt.close()
  with jax.enable_x64(True):
    fresh = accumjax.init_train_state(reference.init_params(), tx, 0)
    restored = checkpoint.Checkpointer(tmp_path).restore(lambda meta: fresh).state
  chex.assert_trees_all_equal_dtypes(restored, state)
  assert restored.params['w1'].dtype == np.float32


def test_same_step_twice_is_an_error_not_a_silent_drop(tmp_path):
  config = config_for('scan', 4)
  tx = accumjax.accumulating_optimizer(adamw(), config)
  state = accumjax.init_train_state(reference.init_params(), tx, 0)
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(state, {})
  with pytest.raises(checkpoint.CheckpointError, match='not newer than the latest step 0'):
    ckpt.save(state, {})
  ckpt.close()


# --- the real training loop: train_and_evaluate with preemption and --resume ---------------

TINY = dict(seq_len=32, batch_size=4, d_model=32, num_layers=1, num_heads=2, max_len=64,
            eval_batches=1, log_every=100, warmup_steps=2, steps=4, eval_every=100, lr=1e-2,
            grad_accum_steps=4, save_every=1)


def _run(out, corpus, stop_after=None, resume=None, log=None, **kw):
  """train_and_evaluate; `stop_after=n` raises the preemption flag at the n-th poll (call)."""
  counter = itertools.count(1)
  cfg = train_config(**{**TINY, 'data': corpus, **kw})
  should_stop = (lambda: next(counter) == stop_after) if stop_after else (lambda: False)
  return train_and_evaluate(cfg, out, log, resume=resume, should_stop=should_stop)


@functools.cache
def _straight_fingerprint(corpus, tmp_root, mode):
  return _run(pathlib.Path(tmp_root) / f'straight-{mode}', corpus,
              accum_mode=mode)['params_fingerprint']


@pytest.fixture
def straight(corpus, tmp_path_factory):
  root = tmp_path_factory.getbasetemp() / 'straight'
  return lambda mode: _straight_fingerprint(corpus, str(root), mode)


def _restore(out, corpus, **cfg_kwargs):
  cfg = train_config(**{**TINY, 'data': corpus, **cfg_kwargs})
  _, params = make_lm(cfg.model, seed=cfg.seed)
  tx = build_optimizer(cfg, validate(cfg))[0]
  return checkpoint.Checkpointer(pathlib.Path(out) / 'checkpoints').restore(
      lambda meta: accumjax.init_train_state(params, tx, cfg.seed, validate(cfg)))


@pytest.mark.parametrize('mode,stop_after', [
    pytest.param('multisteps', 6, marks=pytest.mark.slow),  # mid-cycle: 2 of 4 into update 2
    ('hybrid', 3),       # mid-cycle: c = 2, one call into update 2
    ('scan', 2),         # boundary
])
def test_preempted_run_resumes_bit_identically(tmp_path, corpus, mode, stop_after):
  ref = _run(tmp_path / 'straight', corpus, accum_mode=mode)
  stopped = _run(tmp_path / 'run', corpus, stop_after=stop_after, accum_mode=mode,
                 save_every_micro=0)
  assert stopped['preempted']
  resumed = _run(tmp_path / 'run', corpus, resume='latest', accum_mode=mode)
  assert resumed['params_fingerprint'] == ref['params_fingerprint']
  a = _restore(tmp_path / 'run', corpus, accum_mode=mode)
  b = _restore(tmp_path / 'straight', corpus, accum_mode=mode)
  chex.assert_trees_all_equal(a.state, b.state)
  assert a.meta['data'] == b.meta['data']  # the iterator went on exactly where it was
  lines = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['update'] for r in lines if r['kind'] == 'train'] == [1, 2, 3, 4]


def _stop_mid_cycle(tmp_path, corpus):
  out = tmp_path / 'run'
  assert _run(out, corpus, stop_after=6, accum_mode='multisteps')['preempted']
  return out


def test_resume_refuses_accumulation_change_mid_cycle(tmp_path, corpus):
  out = _stop_mid_cycle(tmp_path, corpus)
  with pytest.raises(accumjax.ConfigError, match=(
      r'is mid-cycle \(update 1, 2/4 micro-batches into the next\); changing '
      r'--grad-accum-steps 4 -> 2 now')):
    _run(out, corpus, resume='latest', accum_mode='multisteps', grad_accum_steps=2)
  with pytest.raises(accumjax.ConfigError, match='--batch-size 4 -> 8'):
    _run(out, corpus, resume='latest', accum_mode='multisteps', batch_size=8)
  with pytest.raises(accumjax.ConfigError, match="--accum-mode 'multisteps' -> 'scan'"):
    _run(out, corpus, resume='latest', accum_mode='scan')


@pytest.mark.slow  # ~13-21 s: the slow set, which CI runs
def test_resume_flushes_partial_cycle_when_asked(tmp_path, corpus):
  out = _stop_mid_cycle(tmp_path, corpus)
  cfg = train_config(**{**TINY, 'data': corpus, 'accum_mode': 'scan', 'grad_accum_steps': 2})
  summary = train_and_evaluate(cfg, out, resume='latest', on_config_change='flush')
  assert summary['updates'] == 4 and np.isfinite(summary['final_train_loss'])
  lines = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  # update 1 from the first run, update 2 = the flushed half cycle, then two scan updates
  assert [r['update'] for r in lines if r['kind'] == 'train'] == [1, 3, 4]


def test_resume_refuses_changes_to_the_math(tmp_path, corpus):
  out = _stop_mid_cycle(tmp_path, corpus)
  for kw, field in [({'d_model': 64}, '--d-model 32 -> 64'), ({'seed': 1}, '--seed 0 -> 1'),
                    ({'lr': 0.1}, '--lr 0.01 -> 0.1'), ({'precision': 'bf16'}, '--precision'),
                    ({'precision': 'fp16'}, "--precision 'fp32' -> 'fp16'"),
                    ({'inject_faults': '3:0'}, '--inject-faults None'), ({'data': None}, '--data')]:
    with pytest.raises(accumjax.ConfigError, match=field):
      _run(out, corpus, resume='latest', accum_mode='multisteps', **kw)


@pytest.mark.slow
def test_harmless_changes_are_allowed_and_bit_identical(tmp_path, corpus, straight):
  out = _stop_mid_cycle(tmp_path, corpus)
  # The fault policy too: it changes nothing while values are finite.
  resumed = _run(out, corpus, resume='latest', accum_mode='multisteps', eval_every=1,
                 log_every=1, keep=5, nonfinite_policy='raise', max_consecutive_skips=1)
  assert resumed['params_fingerprint'] == straight('multisteps')


@pytest.mark.slow
@pytest.mark.parametrize('first,then', [('lazy', 'optax'), ('optax', 'lazy')])
def test_switching_multisteps_impl_mid_cycle_continues_the_cycle(tmp_path, corpus, first, then):
  """A harmless setting: the own cycle and optax.MultiSteps' accumulator hold the same sums, so
  the update in progress goes on (the same losses; other programs, so not the same bits)."""
  ref = _run(tmp_path / 'straight', corpus, accum_mode='multisteps', multisteps_impl=first)
  out = tmp_path / 'run'
  assert _run(out, corpus, stop_after=6, accum_mode='multisteps', multisteps_impl=first)[
      'preempted']  # 2 of 4 micro-batches into update 2
  resumed = _run(out, corpus, resume='latest', accum_mode='multisteps', multisteps_impl=then)
  assert resumed['updates'] == ref['updates']
  np.testing.assert_allclose(resumed['final_train_loss'], ref['final_train_loss'], rtol=1e-5)
  np.testing.assert_allclose(resumed['final_eval_loss'], ref['final_eval_loss'], rtol=1e-5)


@pytest.mark.slow  # ~13-21 s: the slow set, which CI runs
def test_boundary_accumulation_change_is_allowed(tmp_path, corpus):
  out = tmp_path / 'run'
  assert _run(out, corpus, stop_after=4, accum_mode='multisteps')['preempted']  # boundary
  summary = _run(out, corpus, resume='latest', accum_mode='hybrid', grad_accum_steps=2)
  assert summary['updates'] == 4 and np.isfinite(summary['final_train_loss'])


def _latest_state_files(out):
  ckpt = checkpoint.Checkpointer(pathlib.Path(out) / 'checkpoints')
  latest = ckpt.steps()[-1]
  files = [p for p in (ckpt.path(latest) / 'state').rglob('*') if p.is_file()
           and '/d/' in str(p)]
  return latest, sorted(files, key=lambda p: p.stat().st_size)


@pytest.mark.slow  # ~20 s
def test_bit_flip_is_detected_and_older_checkpoint_used(tmp_path, corpus, straight):
  out = _stop_mid_cycle(tmp_path, corpus)
  latest, files = _latest_state_files(out)
  target = files[-1]
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x10
  target.write_bytes(bytes(data))
  logs = []

  class Log:
    def info(self, msg=''):
      logs.append(msg)

    def __getattr__(self, name):
      return lambda *a, **k: None

  resumed = _run(out, corpus, resume='latest', log=Log(), accum_mode='multisteps')
  skipped = [m for m in logs if m.startswith(f'resume: skipped checkpoint {latest}')]
  # A flipped bit inside zstd-compressed chunks may also make them undecodable: either way the
  # checkpoint is skipped with the reason (test_swapped_array_data... pins the fingerprint).
  assert skipped and ('fingerprint mismatch' in skipped[0] or 'unreadable state' in skipped[0])
  assert resumed['params_fingerprint'] == straight('multisteps')


@pytest.mark.slow  # ~13-21 s: the slow set, which CI runs
def test_truncated_and_unfinished_checkpoints_fall_back(tmp_path, corpus, straight):
  out = _stop_mid_cycle(tmp_path, corpus)
  latest, files = _latest_state_files(out)
  for f in files:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  (out / 'checkpoints' / f'{latest + 1}.orbax-checkpoint-tmp-123').mkdir()
  restored = _restore(out, corpus, accum_mode='multisteps')
  reasons = dict(restored.skipped)
  assert restored.step < latest
  assert 'unfinished save' in reasons[f'{latest + 1}.orbax-checkpoint-tmp-123']
  assert 'unreadable state' in reasons[latest]
  resumed = _run(out, corpus, resume='latest', accum_mode='multisteps')
  assert resumed['params_fingerprint'] == straight('multisteps')


def test_no_good_checkpoint_is_a_clear_error(tmp_path, corpus):
  out = _stop_mid_cycle(tmp_path, corpus)
  ckpt = checkpoint.Checkpointer(out / 'checkpoints')
  for step in ckpt.steps():
    for f in (ckpt.path(step) / 'state').rglob('*'):
      if f.is_file() and '/d/' in str(f):
        f.write_bytes(b'')
  with pytest.raises(checkpoint.CheckpointError, match='no usable checkpoint in .*unreadable'):
    _run(out, corpus, resume='latest', accum_mode='multisteps')
  with pytest.raises(accumjax.ConfigError, match='no checkpoints/ in'):
    _run(tmp_path / 'empty', corpus, resume='latest')


# --- abuse of a finished run's checkpoints: nothing lost, nothing silent ---------------------

def _finished(tmp_path, corpus):
  """A finished multisteps run (checkpoints at micro-batches 8, 12, 16: the newest three)."""
  out = tmp_path / 'run'
  _run(out, corpus, accum_mode='multisteps')
  assert checkpoint.Checkpointer(out / 'checkpoints').steps() == [8, 12, 16]
  return out


def _meta_path(out, step):
  return out / 'checkpoints' / str(step) / 'meta' / 'metadata'


@pytest.mark.parametrize('damage', [
    pytest.param('deleted array file', marks=pytest.mark.slow),  # ~16-25 s each
    pytest.param('tampered metadata', marks=pytest.mark.slow),
    pytest.param('empty metadata', marks=pytest.mark.slow)])
def test_a_broken_newest_checkpoint_is_moved_aside_and_the_run_saves_again(
    tmp_path, corpus, straight, damage):
  # Resuming from 12 retrains update 4 and must save step 16 again: with the broken 16 still
  # there Orbax refuses (not newer than the latest), and the work is lost on every retry.
  out = _finished(tmp_path, corpus)
  if damage == 'deleted array file':
    _latest_state_files(out)[1][-1].unlink()
  elif damage == 'tampered metadata':
    meta = json.loads(_meta_path(out, 16).read_text())
    meta['data']['position'] += 1  # a resume would read other rows: must not pass
    _meta_path(out, 16).write_text(json.dumps(meta))
  else:
    _meta_path(out, 16).write_text('{}')
  messages = []
  log = type('Log', (), {'info': lambda self, m='': messages.append(m),
                         '__getattr__': lambda self, name: lambda *a, **k: None})()
  resumed = _run(out, corpus, resume='latest', log=log, accum_mode='multisteps')
  assert resumed['params_fingerprint'] == straight('multisteps')
  skipped = [m for m in messages if m.startswith('resume: skipped checkpoint 16')]
  reason = {'deleted array file': 'unreadable state', 'tampered metadata':
            'metadata fingerprint mismatch', 'empty metadata': 'incomplete metadata'}[damage]
  assert skipped and reason in skipped[0], messages
  aside = list((tmp_path / 'run' / 'checkpoints.moved-aside').glob('*/16'))
  assert len(aside) == 1  # kept for inspection, never deleted
  assert checkpoint.Checkpointer(out / 'checkpoints').steps()[-1] == 16  # saved again


@pytest.mark.slow  # ~13 s
def test_resume_from_an_older_step_rolls_back_and_keeps_the_newer_ones(
    tmp_path, corpus, straight):
  out = _finished(tmp_path, corpus)
  resumed = _run(out, corpus, resume=8, accum_mode='multisteps')
  assert resumed['params_fingerprint'] == straight('multisteps')
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints.moved-aside').glob('*/*')) == \
      ['12', '16']
  lines = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [r['update'] for r in lines if r['kind'] == 'train'] == [1, 2, 3, 4]


@pytest.mark.slow  # ~13-21 s: the slow set, which CI runs
def test_a_half_written_metrics_line_does_not_stop_a_resume(tmp_path, corpus, straight):
  out = _stop_mid_cycle(tmp_path, corpus)
  with open(out / 'metrics.jsonl', 'a') as f:
    f.write('{"kind": "train", "upd')  # killed mid-write
  resumed = _run(out, corpus, resume='latest', accum_mode='multisteps')
  assert resumed['params_fingerprint'] == straight('multisteps')
  lines = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [r['update'] for r in lines if r['kind'] == 'train'] == [1, 2, 3, 4]


@pytest.mark.slow  # ~30 s
def test_resume_refuses_other_data_content_and_a_schedule_that_would_jump(tmp_path, corpus):
  out = _stop_mid_cycle(tmp_path, corpus)  # after update 1 of 4 (warmup 2, cosine)
  # --steps may grow while every update done had the same learning rate under both...
  grown = _run(out, corpus, resume='latest', accum_mode='multisteps', steps=6)
  assert grown['updates'] == 6
  # ...but not once updates past the warm-up were made with the other schedule.
  with pytest.raises(accumjax.ConfigError, match=r'--steps 6 -> 8 on resume would change the '
                                                 r'learning rate of updates already done'):
    _run(out, corpus, resume='latest', accum_mode='multisteps', steps=8)
  # The same --data path with other bytes: the saved position would point at other rows.
  victim = sorted(pathlib.Path(corpus).iterdir())[0]
  original = victim.read_bytes()
  try:
    victim.write_bytes(original + b'\n\nextra paragraph\n')
    with pytest.raises(accumjax.ConfigError, match='the training data changed since checkpoint'):
      _run(out, corpus, resume='latest', accum_mode='multisteps', steps=6)
  finally:
    victim.write_bytes(original)


def test_swapped_array_data_is_caught_by_the_fingerprint(tmp_path):
  # Perfectly readable arrays that are not the ones saved (Orbax checksums nothing): the
  # state directory of another save, put under this step's metadata.
  import shutil
  config = config_for('multisteps', 4)
  tx = accumjax.accumulating_optimizer(adamw(), config)
  state = accumjax.init_train_state(reference.init_params(), tx, 0)
  other = state._replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].add(1e-3),
                                             state.params))
  for name, s in (('a', state), ('b', other)):
    ckpt = checkpoint.Checkpointer(tmp_path / name)
    ckpt.save(s, {})
    ckpt.wait()
    ckpt.close()
  shutil.rmtree(tmp_path / 'a' / '0' / 'state')
  shutil.copytree(tmp_path / 'b' / '0' / 'state', tmp_path / 'a' / '0' / 'state')
  fresh = lambda meta: accumjax.init_train_state(reference.init_params(), tx, 0)
  with pytest.raises(checkpoint.CheckpointError, match='0: fingerprint mismatch'):
    checkpoint.Checkpointer(tmp_path / 'a').restore(fresh)
  assert checkpoint.Checkpointer(tmp_path / 'b').restore(fresh).step == 0  # b itself is fine


def test_a_checkpoint_of_the_earlier_state_layout_is_refused_with_a_reason():
  """Checkpoints written when the sums lived inside optax.MultiStepsState (no 'state_layout'
  in their metadata) are refused before any restore, saying why and what to do."""
  from accumjax.lm import resume
  with pytest.raises(checkpoint.CheckpointError, match=r'state layout 1.*Finish that run'):
    resume._check_layout({'step': 12, 'config': {}})
  resume._check_layout({'step': 12, 'state_layout': resume.STATE_LAYOUT})  # today's: accepted


def test_a_mid_cycle_save_while_updates_are_dispatched_ahead_keeps_the_run_s_statistics(
    tmp_path, corpus):
  """No periodic saves, so the loop reads update u's metrics only after dispatching update
  u + 1; the mid-cycle checkpoints taken during u + 1 must still count update u in the loss
  EMA and the tokens seen, or a run resumed from them logs other numbers than a straight one."""
  kw = dict(accum_mode='multisteps', save_every=0, save_every_micro=1, keep=20)
  straight = _run(tmp_path / 'straight', corpus, **kw)
  resumed = _run(tmp_path / 'straight', corpus, resume=6, **kw)  # 2 calls into update 2
  assert resumed['params_fingerprint'] == straight['params_fingerprint']
  for key in ('final_train_ema', 'tokens_seen', 'final_train_loss', 'b_simple_ema'):
    assert resumed[key] == straight[key], key
