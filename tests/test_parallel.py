"""Data parallelism: 1, 2 and 4 devices give the big-batch update; one reduction per call;
two real jax.distributed processes end bitwise where one 4-device process does.

The device count is fixed when JAX starts, so the multi-device checks run in subprocesses
(tests/dp_check.py with 4 fake CPU devices; experiments.train for the multi-process runs).
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import chex
import pytest

from experiments.kill_resume import final_fingerprint, tiny_corpus, train_argv
from tests.test_equivalence import TOL

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(devices):
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_PLATFORMS='cpu')


def device_check(module: str, *args, devices: int = 4, timeout: int = 900) -> dict:
  """Runs `python -m module *args` on `devices` fake CPU devices (a device count is fixed when
  a process starts) and returns the JSON of its last line."""
  result = subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=ROOT,
                          env=_env(devices), capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def dp():
  return device_check('tests.dp_check', timeout=600)


def test_ran_on_four_devices(dp):
  assert dp['devices'] == 4


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_noise_statistics_count_every_device_s_microbatches(dp, mode):
  """On 4 devices the update holds 4 x K micro-batch samples, whose sums travel in the one
  reduction: the statistics equal the reference over all 4K consecutive row chunks (sums or
  sample counts left per device would give (A - B) / (K - 1) or a device's own A instead)."""
  from tests import reference
  from tests.dp_check import ROWS, K
  batch = reference.make_batches(1, ROWS)[0]
  expected = reference.noise_reference(reference.init_params(), batch, 4 * K)
  chex.assert_trees_all_close(dp['noise'][mode], expected, rtol=2e-4)


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_one_two_four_devices_give_the_big_batch_updates(dp, mode):
  errors = {k: v for k, v in dp['errors'].items() if k.startswith(mode + '/')}
  assert len(errors) == (12 if mode == 'scan' else 6) + (mode == 'hybrid'), errors
  assert max(errors.values()) <= TOL, errors


def test_devices_see_very_different_token_counts(dp):
  # Guards the data: with equal counts per device, a mean of device means would pass too.
  for weights in dp['device_weights'].values():
    assert max(weights) > 2 * min(weights), weights


def test_mean_of_device_means_would_be_caught(dp):
  assert dp['mean_of_device_means_error'] > 100 * TOL


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_one_all_reduce_per_call_none_inside_the_scan(dp, mode):
  counts = dp['collectives'][mode]
  assert counts['per_call'] == {'all-reduce': {'in_loop': 0, 'outside': 1}}, counts
  reductions_per_update = counts['calls_per_update'] * counts['per_call']['all-reduce']['outside']
  assert reductions_per_update == {'scan': 1, 'hybrid': 2, 'multisteps': 4}[mode]


def test_ordered_reduction_is_one_all_gather(dp):
  assert dp['collectives_ordered']['per_call'] == {'all-gather': {'in_loop': 0, 'outside': 1}}


def test_plain_jit_reduces_inside_the_loop_and_is_still_correct(dp):
  naive = dp['naive']
  assert naive['collectives']['all-reduce']['in_loop'] >= 1, naive
  assert naive['error'] <= TOL


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_nan_on_one_device_skips_the_whole_update_on_every_device(dp, mode):
  r = dp['faults'][f'{mode}/skip_update']
  first, second = r['metrics'][0], r['metrics'][1]
  assert r['unchanged'] and r['second_moved'] and r['finite_after'], r
  # One micro-batch on one device of four: counted once, found at cycle index 1.
  assert (first['skipped'], first['nonfinite'], first['first_nonfinite']) == (1, 1, 1), first
  assert (second['skipped'], second['skipped_updates'], second['nonfinite_microbatches']) == \
      (0, 1, 1), second


@pytest.mark.parametrize('mode', ['scan', 'multisteps', 'hybrid'])
def test_skip_microbatch_on_one_device_is_the_big_batch_of_the_rest(dp, mode):
  r = dp['faults'][f'{mode}/skip_microbatch']
  assert r['finite_after'] and r['metrics'][0]['skipped'] == 0, r
  assert r['error_vs_remaining'] <= TOL, r


def test_fp16_overflow_on_one_device_halves_the_scale_and_skips_that_update(dp):
  r = dp['faults']['scan/fp16 overflow']
  m = r['metrics']
  assert r['unchanged'] and r['second_moved'], r
  assert (m[0]['loss_scale'], m[1]['loss_scale'], m[2]['loss_scale_after']) == \
      (2.0 ** 15, 2.0 ** 14, 2.0 ** 14), m
  assert m[1]['skipped_updates'] == 1 and m[1]['skipped'] == 0, m


def test_fp16_on_four_devices_matches_one_device(dp):
  # Loss scaling is per micro-batch on each device and unscaled (float32) before the
  # reduction, so devices only change float16 rounding: params after 3 AdamW updates differ
  # by ~1e-3 relative, as fp16 on one device differs from the fp32 reference. A missing
  # unscale would be off by the scale (2**15).
  errors = dp['fp16']
  assert max(errors.values()) <= 5e-3, errors


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(argv, extra=()):
  port = _free_port()
  procs = [subprocess.Popen(
      [*argv, *extra, '--coordinator-address', f'127.0.0.1:{port}', '--num-processes', '2',
       '--process-id', str(i)], cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]


@pytest.mark.slow
def test_two_processes_match_one_four_device_process_and_resume_mid_cycle(tmp_path):
  corpus = tiny_corpus(tmp_path / 'corpus')

  def argv(out):
    a = train_argv(out, corpus, 'hybrid', 'fp32', steps=4)
    a[a.index('--batch-size') + 1] = '1'  # per device: 1 x K 4 x 4 devices = 16 rows
    return [*a, '--dp-reduction', 'ordered', '--keep', '20']

  single = subprocess.run(argv(tmp_path / 'one'), cwd=ROOT, env=_env(4), capture_output=True,
                          text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  assert 'effective batch           1 x 4 x 4 device(s) = 16 sequences' in single.stdout

  out0, out1 = _two_processes(argv(tmp_path / 'two'))
  assert 'mesh data=4 (2 process(es) x 2 device(s))' in out0
  # Logs come from process 0 only. Gloo itself prints its connection lines, from several
  # threads at once, one `<<` piece per write, so two lines can interleave piece by piece (seen:
  # "[Gloo] Rank [Gloo] Rank 23 is connected to  is connected to 3 peer ranks."): strip every
  # piece, numbers apart from their words.
  gloo = re.compile(r'\[Gloo\]|Rank|is connected to|Expected number of connected peer ranks is :'
                    r'|peer ranks\.|\d+')
  assert not gloo.sub('', out1).strip(), out1
  expected = final_fingerprint(tmp_path / 'one')
  assert expected is not None
  assert final_fingerprint(tmp_path / 'two') == expected

  # Resume the two-process run from a mid-cycle checkpoint it wrote (2 of 4 micro-batches
  # into update 4: Orbax step 14 = micro-batches done per device).
  resumed = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'two', resumed)
  steps = sorted(int(p.name) for p in (resumed / 'checkpoints').iterdir() if p.name.isdigit())
  assert 14 in steps, steps
  for s in steps:
    if s > 14:
      shutil.rmtree(resumed / 'checkpoints' / str(s))
  out0, _ = _two_processes(argv(resumed), ['--resume'])
  assert 'resume: checkpoint 14 (update 3, 2/4 micro-batches into the next)' in out0
  assert final_fingerprint(resumed) == expected


def _losses(out):
  lines = (out / 'metrics.jsonl').read_text().splitlines()
  return [r['loss'] for r in map(json.loads, lines) if r['kind'] == 'train']


def _keep_checkpoints_up_to(out, step):
  steps = sorted(int(p.name) for p in (out / 'checkpoints').iterdir() if p.name.isdigit())
  assert step in steps, steps
  for s in steps:
    if s > step:
      shutil.rmtree(out / 'checkpoints' / str(s))


@pytest.mark.slow
def test_fsdp_across_two_processes_and_checkpoints_across_meshes(tmp_path):
  """The fsdp axis spans two jax.distributed processes (2 devices each): the run matches one
  4-device process and resumes mid-cycle bitwise. A checkpoint of --mesh fsdp=4 resumes
  mid-cycle on data=2,fsdp=2, and that run's on one device (4 rows per micro-batch: the same
  global rows), the losses staying those of the uninterrupted run."""
  corpus = tiny_corpus(tmp_path / 'corpus')

  def argv(out, mesh, batch=1):
    a = train_argv(out, corpus, 'hybrid', 'fp32', steps=4)
    a[a.index('--batch-size') + 1] = str(batch)
    return [*a, '--keep', '20'] + (['--mesh', mesh] if mesh else [])

  def run(out, mesh, devices=4, batch=1, extra=()):
    done = subprocess.run([*argv(out, mesh, batch), *extra], cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout

  single = run(tmp_path / 'one', 'fsdp=4')
  assert 'mesh data=1,fsdp=4 (1 process(es) x 4 device(s))' in single
  expected = _losses(tmp_path / 'one')

  out0, _ = _two_processes(argv(tmp_path / 'two', 'fsdp=4'))
  assert 'mesh data=1,fsdp=4 (2 process(es) x 2 device(s))' in out0
  chex.assert_trees_all_close(_losses(tmp_path / 'two'), expected, rtol=TOL)
  resumed = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'two', resumed)
  _keep_checkpoints_up_to(resumed, 14)  # 2 of 4 micro-batches into update 4
  out0, _ = _two_processes(argv(resumed, 'fsdp=4'), ['--resume'])
  assert 'resume: checkpoint 14 (update 3, 2/4 micro-batches into the next)' in out0
  assert final_fingerprint(resumed) == final_fingerprint(tmp_path / 'two')

  hop = tmp_path / 'hop'
  shutil.copytree(tmp_path / 'one', hop)
  _keep_checkpoints_up_to(hop, 6)  # 2 of 4 into update 2
  log = run(hop, 'data=2,fsdp=2', extra=['--resume'])
  assert 'resume: mesh fsdp=4 (4 device(s)) -> data=2,fsdp=2 (4)' in log, log
  assert 'resume: checkpoint 6 (update 1, 2/4 micro-batches into the next)' in log
  chex.assert_trees_all_close(_losses(hop), expected, rtol=TOL)
  _keep_checkpoints_up_to(hop, 10)  # 2 of 4 into update 3, written on data=2,fsdp=2
  log = run(hop, None, devices=1, batch=4, extra=['--resume'])
  assert 'resume: mesh data=2,fsdp=2 (4 device(s)) -> auto (1)' in log, log
  chex.assert_trees_all_close(_losses(hop), expected, rtol=TOL)
