"""The real process: SIGTERM, SIGKILL, crashes during async saves, failed saves, and restoring
on a different device count. Each runs `experiments.train` (or a helper) as a subprocess."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from experiments import kill_resume

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def reference(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp('reference') / 'run'
  done = kill_resume.run(kill_resume.train_argv(out, corpus, 'multisteps', 'fp32'))
  assert done.returncode == 0, done.stderr[-2000:]
  return kill_resume.final_fingerprint(out)


@pytest.mark.slow  # ~40 s with its reference run
def test_sigterm_checkpoints_mid_cycle_and_resumes_identically(tmp_path, corpus, reference):
  out = tmp_path / 'run'
  argv = kill_resume.train_argv(out, corpus, 'multisteps', 'fp32', save_every_micro=0)
  argv.append('--log-microbatches')
  proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  lines = []
  for line in proc.stdout:  # preempt while update 3 is half accumulated
    lines.append(line)
    if line.startswith('update [3/8] accum 2/4'):
      proc.send_signal(signal.SIGTERM)
      break
  rest, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  text = ''.join(lines) + rest
  assert 'preempted: checkpoint written to' in text
  assert 'micro-batches into the next' in text
  assert 'summary' not in text
  resumed = kill_resume.run(kill_resume.train_argv(out, corpus, 'multisteps', 'fp32') +
                            ['--resume'])
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resume: checkpoint' in resumed.stdout
  assert kill_resume.final_fingerprint(out) == reference


@pytest.mark.slow
def test_failed_save_surfaces_and_is_never_restored(tmp_path, corpus, reference):
  out = tmp_path / 'run'
  argv = kill_resume.train_argv(out, corpus, 'multisteps', 'fp32')
  first = kill_resume.run(kill_resume.train_argv(out, corpus, 'multisteps', 'fp32', steps=2))
  assert first.returncode == 0, first.stderr[-2000:]

  # A 16 KiB file-size limit (writes fail with EFBIG; SIGXFSZ ignored): config.json (~2 KiB)
  # and metrics.jsonl (~5 KiB for the whole run) fit, a checkpoint's array files (>100 KiB)
  # do not. Set by a shell rather than a preexec_fn: forking this multithreaded (JAX) process
  # to run Python could deadlock.
  limited = ['bash', '-c', 'trap "" XFSZ; ulimit -f 16; exec "$@"', 'bash', *argv, '--resume']
  failed = subprocess.run(limited, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert failed.returncode == 1, failed.stderr[-2000:]
  # Orbax's background threads log the failure too (absl ERROR records, each written whole);
  # the run's own line is the one naming the cause, once.
  errors = [x for x in failed.stderr.splitlines() if x.startswith('error: ')]
  assert len(errors) == 1 and 'save failed' in errors[0] and 'File too large' in errors[0], (
      failed.stderr[-6000:])
  assert 'Event loop is closed' not in failed.stderr, failed.stderr[-6000:]
  resumed = kill_resume.run([*argv, '--resume'])
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert kill_resume.final_fingerprint(out) == reference


CRASH_AFTER_ASYNC_SAVE = '''
import os, sys, jax
import accumjax
from accumjax import checkpoint
from tests import reference
from tests.test_equivalence import adamw, config_for
config = config_for('multisteps', 4)
tx = accumjax.accumulating_optimizer(adamw(), config)
state = accumjax.init_train_state(reference.init_params(), tx, 0)
ckpt = checkpoint.Checkpointer(sys.argv[1])
ckpt.save(state, {})
ckpt.wait()
print(checkpoint.fingerprint(state), flush=True)
later = state._replace(microbatch_step=state.microbatch_step + 1,
                       params=jax.tree.map(lambda p: p + 1.0, state.params))
print(checkpoint.fingerprint(later), flush=True)
ckpt.save(later, {})
os._exit(1)  # crash right after the async save started
'''


def test_crash_right_after_async_save_restores_only_whole_checkpoints(tmp_path):
  import accumjax
  from accumjax import checkpoint
  from tests import reference as ref
  from tests.test_equivalence import adamw, config_for

  directory = tmp_path / 'ckpt'
  done = subprocess.run([sys.executable, '-c', CRASH_AFTER_ASYNC_SAVE, str(directory)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  first, second = done.stdout.split()
  tx = accumjax.accumulating_optimizer(adamw(), config_for('multisteps', 4))
  restored = checkpoint.Checkpointer(directory).restore(
      lambda meta: accumjax.init_train_state(ref.init_params(), tx, 0))
  # Either the crash beat the commit (step 0 comes back, the unfinished save is reported) or
  # the save had committed; never a mixture.
  got = checkpoint.fingerprint(restored.state)
  assert (restored.step, got) in ((0, first), (1, second))
  if restored.step == 0:
    assert any('unfinished' in why for _, why in restored.skipped) or \
        not list(directory.glob('1*'))


def test_save_on_4_devices_restore_on_2_then_1(tmp_path):
  directory = tmp_path / 'ckpt'
  results = []
  for devices, action in ((4, 'save'), (2, 'restore'), (1, 'restore')):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    done = subprocess.run([sys.executable, '-m', 'tests.mesh_restore', action, str(directory)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    results.append(json.loads(done.stdout.strip().splitlines()[-1]))
  saved, on2, on1 = results
  assert [r['devices'] for r in results] == [4, 2, 1]
  assert on2['leaf_devices'] == 2 and on1['leaf_devices'] == 1
  assert on2['step'] == saved['step'] and on2['fingerprint'] == saved['fingerprint']
  assert on1['step'] == saved['step'] + 1
  assert on1['fingerprint'] != saved['fingerprint']  # the +1 counter shows it is the re-save


@pytest.mark.slow
def test_random_sigkills_resume_bit_identically(tmp_path):
  # one trial of each kill kind: at a random moment, in a save, in the very first save
  summary, rows = kill_resume.run_trials(3, seed=1, workdir=tmp_path)
  assert summary == 'trials 3, identical 3, failed 0'
  assert [r[3] for r in rows] == list(kill_resume.KILLS)
  assert sum(r[4] for r in rows) >= 2  # the runs really were killed (timing decides how often)
  assert sum(r[5] for r in rows) >= 1  # and at least one kill landed while a save was written
