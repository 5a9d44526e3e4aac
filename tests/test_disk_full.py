"""A disk that fills while the run writes metrics, a checkpoint or the plot: one `error:` line,
exit 1, the newest committed checkpoint intact, and `--resume` (with space again) ends with the
same params as a run that never hit the full disk.

For the checkpoint and the plot, the disk is a real 64 MiB tmpfs filled to the last byte at the
chosen moment, so the failure is the kernel's ENOSPC through Orbax, tensorstore and matplotlib.
Where a tmpfs cannot be mounted (not root), the chosen write raises ENOSPC instead, which still
checks the handling. A metrics line is the exception: appending ~300 bytes to metrics.jsonl
usually fits in the slack of its last page even on a full disk, so the metrics case writes half
the line and then raises ENOSPC (a full disk mid-write, leaving a half-written line).
"""

import errno
import json
import pathlib
import subprocess

import pytest

from accumjax.lm import logs
from accumjax.lm import train as train_lib
from experiments import train as train_cli

ARGV = ['--seq-len', '32', '--batch-size', '4', '--grad-accum-steps', '2', '--d-model', '32',
        '--layers', '1', '--heads', '2', '--max-len', '64', '--steps', '4', '--eval-every', '2',
        '--eval-batches', '1', '--save-every', '1', '--keep', '2', '--no-progress']


@pytest.fixture
def disk(tmp_path):
  """(directory, fill, mounted): a small filesystem, a function that leaves it no free byte,
  and whether it is a real tmpfs (else `fill` raises ENOSPC itself)."""
  where = tmp_path / 'disk'
  where.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(where)],
                           capture_output=True).returncode == 0

  def fill():
    if not mounted:
      raise OSError(errno.ENOSPC, 'No space left on device (simulated: no tmpfs)')
    with open(where / 'filler', 'wb', buffering=0) as f:  # unbuffered: close cannot fail
      for size in (1 << 20, 4096, 1):  # big blocks, then the last partial ones
        try:
          while True:
            f.write(b'\0' * size)
        except OSError as e:
          assert e.errno == errno.ENOSPC, e

  yield where, fill, mounted
  if mounted:
    subprocess.run(['umount', '-l', str(where)], check=False)


def _fingerprint(out: pathlib.Path):
  lines = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines() if x]
  return [r for r in lines if r['kind'] == 'summary'][-1]['params_fingerprint']


def _cli(capsys, *argv):
  rc = train_cli.main(list(argv))
  return rc, capsys.readouterr().err


def _half_a_line_then_enospc(writer, record):
  line = json.dumps(record) + '\n'
  writer._f.write(line[:len(line) // 2])
  writer._f.flush()
  raise OSError(errno.ENOSPC, 'No space left on device')


# Where the disk fills: update 3's metrics record (written half), update 3's checkpoint (waited
# for, so that it is the save that fails, not a later write), the final plot. The target is
# wrapped so that the disk fills just before it runs.
TARGETS = {'metrics': (logs.MetricsWriter, 'write', 4, None),
           'checkpoint': (train_lib, 'save', 3, lambda run: run.progress.ckpt.wait()),
           'plot': (logs, 'plot_losses', 1, None)}
MESSAGES = {'metrics': "could not write the run's outputs",
            'checkpoint': 'checkpoint save', 'plot': "could not write the run's outputs"}


@pytest.mark.parametrize('what', [  # ~13 s each; one in the default run
    w if w == 'checkpoint' else pytest.param(w, marks=pytest.mark.slow) for w in sorted(TARGETS)])
def test_a_full_disk_is_one_error_line_and_resume_ends_the_same(what, disk, tmp_path, corpus,
                                                               capsys, monkeypatch):
  where, fill, mounted = disk
  rc, err = _cli(capsys, *ARGV, '--data', corpus, '--out', str(tmp_path / 'reference'))
  assert rc == 0, err
  reference = _fingerprint(tmp_path / 'reference')

  module, name, nth, after = TARGETS[what]
  original, calls = getattr(module, name), []

  def filled_first(*args, **kwargs):
    calls.append(1)
    if len(calls) != nth:
      return original(*args, **kwargs)
    if what == 'metrics':
      _half_a_line_then_enospc(*args)
    fill()
    result = original(*args, **kwargs)
    if after:
      after(*args)
    return result

  monkeypatch.setattr(module, name, filled_first)
  out = where / 'run'
  rc, err = _cli(capsys, *ARGV, '--data', corpus, '--out', str(out))
  monkeypatch.undo()
  lines = err.strip().splitlines()
  assert rc == 1 and len(lines) == 1 and lines[0].startswith('error: '), err
  assert MESSAGES[what] in err, err
  assert 'No space left on device' in err or 'RESOURCE_EXHAUSTED' in err or 'ENOSPC' in err, err
  assert '--resume' in err  # it says how to go on
  assert not (out / '.lock').exists()  # a failed run releases its out dir

  if what == 'metrics':
    assert not (out / 'metrics.jsonl').read_text().endswith('\n')  # it did stop mid-line
  if (where / 'filler').exists():
    (where / 'filler').unlink()
  rc, err = _cli(capsys, *ARGV, '--data', corpus, '--out', str(out), '--resume')
  assert rc == 0, err
  assert _fingerprint(out) == reference
