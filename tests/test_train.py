"""The main job end to end: outputs, falling loss, mode and batch-shape equivalence, bad flags."""

import json

import numpy as np
import pytest

from accumjax.core import ConfigError
from accumjax.lm import config as lm_config
from accumjax.lm import data as data_lib
from accumjax.lm.train import train_and_evaluate
from experiments import train as train_cli
from tests.helpers import train_config

TINY = dict(seq_len=32, batch_size=4, d_model=32, num_layers=1, num_heads=2, max_len=64,
            eval_batches=2, log_every=2, warmup_steps=2)


def _records(out):
  lines = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  return [r for r in lines if r['kind'] == 'train'], [r for r in lines if r['kind'] == 'eval'], \
      lines[-1]


def test_smoke_outputs_and_loss_falls(tmp_path):
  cfg = train_config(**TINY, grad_accum_steps=2, steps=12, eval_every=6, lr=1e-2)
  summary = train_and_evaluate(cfg, tmp_path)
  train, evals, last = _records(tmp_path)
  assert [r['update'] for r in train] == list(range(1, 13))
  assert [r['update'] for r in evals] == [6, 12]
  assert last['kind'] == 'summary' and last['params_fingerprint'] == summary['params_fingerprint']
  assert train[-1]['loss'] < train[0]['loss'] - 1.0, (train[0]['loss'], train[-1]['loss'])
  assert evals[-1]['loss'] < evals[0]['loss']
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['accumulation']['num_microbatches'] == 2
  assert config['accumulation']['tokens_per_update'] == 4 * 2 * 32
  live = config['run']['live_bytes_per_device']  # the whole live set of a call, part by part
  assert live['total'] == sum(v for k, v in live.items() if k != 'total')
  assert live['activations'] > 0 and live['params'] == config['run']['state_bytes_per_device'][
      'params']
  png = (tmp_path / 'loss.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


def _losses(tmp_path, name, **kw):
  cfg = train_config(**{**TINY, 'steps': 5, 'eval_every': 100, 'lr': 1e-2, **kw})
  summary = train_and_evaluate(cfg, tmp_path / name)
  train, _, _ = _records(tmp_path / name)
  return np.array([r['loss'] for r in train]), summary


def test_modes_give_the_same_losses_update_by_update(tmp_path):
  scan, s1 = _losses(tmp_path, 'scan', grad_accum_steps=4, accum_mode='scan')
  multi, s2 = _losses(tmp_path, 'multi', grad_accum_steps=4, accum_mode='multisteps')
  hybrid, s3 = _losses(tmp_path, 'hybrid', grad_accum_steps=4, accum_mode='hybrid')
  np.testing.assert_allclose(multi, scan, rtol=1e-5)
  np.testing.assert_allclose(hybrid, scan, rtol=1e-5)
  np.testing.assert_allclose(s2['final_eval_loss'], s1['final_eval_loss'], rtol=1e-5)
  np.testing.assert_allclose(s3['final_eval_loss'], s1['final_eval_loss'], rtol=1e-5)
  assert scan[-1] < scan[0]  # the comparison is over real training, not a flat line


def test_batch8_k4_matches_batch32_k1(tmp_path):
  acc, _ = _losses(tmp_path, 'acc', batch_size=8, grad_accum_steps=4)
  big, _ = _losses(tmp_path, 'big', batch_size=32, grad_accum_steps=1)
  np.testing.assert_allclose(acc, big, rtol=1e-5)
  # And it would notice a different batch: half the effective batch gives other losses.
  half, _ = _losses(tmp_path, 'half', batch_size=8, grad_accum_steps=2)
  assert np.max(np.abs(half[1:] - big[1:]) / big[1:]) > 1e-3


def test_cli_runs_and_tokens_per_update_sets_k(tmp_path, capsys):
  out = tmp_path / 'cli'
  rc = train_cli.main([
      '--seq-len', '32', '--batch-size', '4', '--tokens-per-update', '384', '--d-model', '32',
      '--layers', '1', '--heads', '2', '--max-len', '64', '--steps', '2', '--eval-every', '2',
      '--eval-batches', '1', '--log-every', '1', '--accum-mode', 'multisteps',
      '--log-microbatches', '--out', str(out)])
  text = capsys.readouterr().out
  assert rc == 0
  assert 'K (micro-batches/update)  3' in text
  assert 'update [2/2] loss' in text and 'accum 3/3' in text
  assert 'params fingerprint' in text
  assert json.loads((out / 'config.json').read_text())['accumulation']['num_microbatches'] == 3


@pytest.mark.parametrize('argv,message', [
    (['--grad-accum-steps', '0'], '--grad-accum-steps 0 must be an integer >= 1'),
    (['--lr=-1e-3'], '--lr -0.001 must be a positive finite number'),
    (['--lr', '0'], '--lr 0.0 must be a positive finite number'),
    (['--tokens-per-update', '1000'], '--tokens-per-update 1000 is not a positive multiple of'),
    (['--data', '/nonexistent/corpus'], "--data '/nonexistent/corpus' does not exist"),
    (['--seq-len', '512'], '--seq-len 512 is longer than the model allows (--max-len 256)'),
    (['--accum-mode', 'hybrid', '--grad-accum-steps', '4', '--microbatches-per-call', '3'],
     'c=3, allowed: [1, 2, 4]'),
    (['--precision', 'fp8'], "invalid choice: 'fp8'"),
    (['--mesh', 'data=3'], '--mesh data=3 needs 3 devices; this run has 1'),
    (['--mesh', 'model=2'], "--mesh 'model=2'; allowed: auto, data=D, fsdp=F or data=D,fsdp=F"),
    (['--mesh', 'fsdp=2'], r'--mesh fsdp=2: fsdp must be an int from 1 to 1'),
    (['--fsdp-reduce', 'layer'], "invalid choice: 'layer'"),
    (['--accumulator-memory', 'host'], "--accumulator-memory 'host' keeps the sums between the "
                                       'calls of an update, but scan mode'),
    (['--num-processes', '2'], 'multi-process needs --coordinator-address, --num-processes and '
                               '--process-id together'),
    (['--dp-reduction', 'ring'], "invalid choice: 'ring'"),
    # Every float flag finite and in range; seeds that numpy takes; options that would be ignored.
    (['--weight-decay', 'inf'], '--weight-decay inf must be a finite number >= 0'),
    (['--clip-norm', 'nan'], '--clip-norm nan must be a positive finite number'),
    (['--dropout', 'nan'], '--dropout nan must be in [0, 1)'),
    (['--seed', '-1'], '--seed -1 must be an integer in [0, 2**32)'),
    (['--seed', str(2**32)], f'--seed {2**32} must be an integer in [0, 2**32)'),
    (['--save-every-micro', '1'], '--save-every-micro 1 saves between the calls of an update, '
                                  'but scan mode with K=4 makes one call per update'),
    (['--layers', '0'], '--layers 0 must be an integer >= 1'),
    # K that changes between updates
    (['--grad-accum-steps', 'many'], "'many': an integer >= 1, or auto"),
    (['--grad-accum-schedule', '0:2,x:4'], "'x:4' is not U:K"),
    (['--grad-accum-schedule', '0:2', '--grad-accum-steps', '4'], 'not several'),
    (['--grad-accum-steps', 'auto', '--no-noise-stats'], 'needs --noise-stats'),
    (['--lr-batch-scaling', 'cubic'], "invalid choice: 'cubic'"),
])
def test_bad_flags_fail_with_one_line_before_writing(tmp_path, capsys, argv, message):
  out = tmp_path / 'never'
  try:
    rc = train_cli.main([*argv, '--out', str(out)])
  except SystemExit as e:  # argparse's own checks (choices, types) exit directly
    rc = e.code
  assert rc == 2
  err = capsys.readouterr().err
  assert message in err, err
  assert len(err.strip().splitlines()) == 1
  assert not out.exists()


def test_iterator_is_deterministic_and_resumable():
  train, _ = data_lib.load_splits(None, 32)
  a = data_lib.RowIterator(train, seed=7)
  first = [a.next_rows(5) for _ in range(3)]
  state = a.state()
  after = [a.next_rows(5) for _ in range(3)]
  b = data_lib.RowIterator(train, seed=7)
  for x, y in zip(first, [b.next_rows(5) for _ in range(3)], strict=True):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  c = data_lib.RowIterator(train, seed=7)
  c.set_state(state)
  for x, y in zip(after, [c.next_rows(5) for _ in range(3)], strict=True):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  other = data_lib.RowIterator(train, seed=8).next_rows(5)
  assert not np.array_equal(other['inputs'], first[0]['inputs'])


def test_iterator_crosses_epochs_with_a_new_order(tmp_path):
  path = tmp_path / 'tiny.txt'
  path.write_text('\n\n'.join(f'paragraph {i} ' * (i % 5 + 1) for i in range(60)))
  train, evals = data_lib.load_splits(str(path), 16)
  it = data_lib.RowIterator(train, seed=0)
  n = len(train.lengths)
  epoch0 = it.next_rows(n)['inputs']
  epoch1 = it.next_rows(n)['inputs']
  assert it.state() == {'epoch': 2, 'position': 0}
  assert sorted(map(bytes, epoch0)) == sorted(map(bytes, epoch1))
  assert not np.array_equal(epoch0, epoch1)
  assert len(evals.lengths) > 0


def test_default_corpus_is_real_and_variable_length():
  train, evals = data_lib.load_splits(None, 128)
  assert train.num_files > 500 and train.num_bytes > 5_000_000 and evals.num_files > 10
  mask = data_lib.RowIterator(train, 0).next_rows(32)['mask']
  counts = mask.reshape(4, 8, -1).sum(axis=(1, 2))
  assert counts.max() > counts.min()  # micro-batches carry different token counts
  assert (train.lengths < 129).mean() > 0.2


TINY_ARGV = ['--seq-len', '32', '--batch-size', '4', '--grad-accum-steps', '2', '--d-model', '32',
             '--layers', '1', '--heads', '2', '--max-len', '64', '--steps', '2',
             '--eval-batches', '1', '--save-every', '1']


def _cli(capsys, *argv):
  try:
    rc = train_cli.main(list(argv))
  except SystemExit as e:
    rc = e.code
  return rc, capsys.readouterr().err


def test_out_dirs_that_cannot_hold_the_run_are_refused_before_writing(tmp_path, corpus, capsys):
  afile = tmp_path / 'afile'
  afile.write_text('keep me')
  rc, err = _cli(capsys, *TINY_ARGV, '--data', corpus, '--out', str(afile))
  assert rc == 2 and 'is an existing file, not a directory' in err and len(err.splitlines()) == 1
  assert afile.read_text() == 'keep me'
  # A directory holding another run's checkpoints: refused without --resume, nothing touched.
  out = tmp_path / 'run'
  assert _cli(capsys, *TINY_ARGV, '--data', corpus, '--out', str(out))[0] == 0
  before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
  rc, err = _cli(capsys, *TINY_ARGV, '--data', corpus, '--out', str(out), '--lr', '0.1')
  assert rc == 2 and 'already holds a run with checkpoints; pass --resume' in err, err
  assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before


def test_one_run_per_out_dir_and_a_stale_lock_is_taken_over(tmp_path, corpus, capsys):
  import os
  import subprocess
  out = tmp_path / 'run'
  out.mkdir()
  (out / '.lock').write_text(str(os.getpid()))  # a live run holds it
  rc, err = _cli(capsys, *TINY_ARGV, '--data', corpus, '--out', str(out))
  assert rc == 2 and 'is in use by another run' in err, err
  assert not (out / 'metrics.jsonl').exists()
  dead = subprocess.Popen(['true'])
  dead.wait()
  (out / '.lock').write_text(str(dead.pid))  # a SIGKILLed run left it
  rc, err = _cli(capsys, *TINY_ARGV, '--data', corpus, '--out', str(out))
  assert rc == 0, err
  assert not (out / '.lock').exists()  # released at the end


def test_data_errors_say_what_is_wrong_and_what_is_needed(tmp_path, capsys):
  loop_link = tmp_path / 'loop'
  loop_link.symlink_to(loop_link)
  rc, err = _cli(capsys, '--data', str(loop_link), '--out', str(tmp_path / 'a'))
  assert rc == 2 and 'is a symbolic link that cannot be followed' in err, err
  tiny = tmp_path / 'tiny.txt'
  tiny.write_text('x')
  rc, err = _cli(capsys, '--data', str(tiny), '--out', str(tmp_path / 'b'))
  assert rc == 2 and 'split of' in err and 'needs at least one paragraph' in err, err
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_a_call_too_big_for_host_memory_is_refused_with_what_fits(tmp_path, corpus, capsys):
  from accumjax.lm import train as train_lib
  out = tmp_path / 'run'
  rc, err = _cli(capsys, *TINY_ARGV, '--data', corpus, '--out', str(out),
                 '--grad-accum-steps', '100000000')  # scan: 10^8 micro-batches in one call
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert '(from --grad-accum-steps 100000000) in scan mode' in err and 'is available' in err, err
  assert 'At most' in err and not out.exists()
  # the same limit, with the available memory given: what fits is said exactly
  cfg = train_config(**TINY, grad_accum_steps=64)
  accum = lm_config.validate(cfg, 1)
  per_mb = 4 * data_lib.host_bytes_per_row(32)
  train_lib.check_host_memory(cfg, accum, 1, available=64 * per_mb)  # fits exactly
  with pytest.raises(ConfigError, match='At most 63 micro-batches fit in one call'):
    train_lib.check_host_memory(cfg, accum, 1, available=64 * per_mb - 1)
  hybrid = lm_config.validate(train_config(**TINY, grad_accum_steps=64, accum_mode='hybrid',
                                           microbatches_per_call=8), 1)
  train_lib.check_host_memory(cfg, hybrid, 1, available=8 * per_mb)  # only a call's share


def test_running_out_of_host_memory_midway_is_one_line(tmp_path, corpus, capsys, monkeypatch):
  def no_memory(self, n, part=None):
    raise MemoryError(f'Unable to allocate {n * 33 * 4} bytes for an array')  # numpy's words

  monkeypatch.setattr(data_lib.RowIterator, 'next_rows', no_memory)
  rc, err = _cli(capsys, *TINY_ARGV, '--data', corpus, '--out', str(tmp_path / 'run'))
  assert rc == 1 and len(err.splitlines()) == 1 and 'error: out of host memory' in err, err


def test_the_prose_corpus_is_real_english_and_needs_no_files():
  train, held_out = data_lib.load_splits('builtin:prose', 128)
  assert train.num_files >= 60 and held_out.num_files >= 3
  assert train.num_bytes > 300_000
  text = bytes(train.tokens[train.lengths > 100][0][:100].astype(np.uint8))
  assert text.isascii() and b' the ' in bytes(train.tokens[:200][train.tokens[:200] < 256]
                                               .astype(np.uint8))
  assert train.fingerprint != data_lib.load_splits(None, 128)[0].fingerprint


@pytest.mark.slow
def test_the_trainer_takes_the_prose_corpus_by_name(tmp_path):
  summary = train_and_evaluate(train_config(**TINY, data='builtin:prose', steps=2,
                                            eval_every=2, lr=1e-2), tmp_path / 'run')
  assert np.isfinite(summary['final_eval_loss'])
  config = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert 'pydoc_data/topics.py' in config['run']['data']
