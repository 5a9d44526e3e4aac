"""Reliability: SIGKILL the real `experiments.train` at random moments, resume until it
finishes, and check the final params are bit-identical to an uninterrupted run.

    python -m experiments.kill_resume --trials 100    # ~70 minutes on 2 CPU cores

Each trial picks a mode (multisteps / hybrid / scan) and precision (fp32 / bf16) and a kill
kind, runs a tiny model on a few stdlib files with a checkpoint after every call, kills each of
its first attempts, and resumes with --resume until a run exits 0. The kill kinds:

  random      after a delay uniform over an uninterrupted run's duration (start-up included)
  save        while a checkpoint is being written: the moment the n-th save's
              `N.orbax-checkpoint-tmp` directory appears (n random), before it is committed
  first-save  while the very first checkpoint of the run is being written (no good one yet)

A kill counts as "in a save" only if a tmp directory of that attempt (not one an earlier killed
attempt left behind) was still there when the process was dead (checked after the kill).
Expected result: `trials N, identical N, failed 0`. Writes the table to
benchmarks/kill_resume.md.
"""

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODES = [('multisteps', 'fp32'), ('hybrid', 'bf16'), ('scan', 'fp32'), ('multisteps', 'bf16'),
         ('hybrid', 'fp32')]
KILLS = ('random', 'save', 'first-save')
TMP = 'orbax-checkpoint-tmp'


def tiny_corpus(directory: pathlib.Path) -> str:
  directory.mkdir(parents=True, exist_ok=True)
  lib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  for name in ('textwrap.py', 'shlex.py', 'fnmatch.py', 'glob.py'):
    shutil.copy(lib / name, directory / name)
  return str(directory)


def train_argv(out, corpus, mode, precision, steps=8, save_every_micro=1):
  return [sys.executable, '-m', 'experiments.train', '--data', corpus, '--out', str(out),
          '--seq-len', '32', '--batch-size', '4', '--grad-accum-steps', '4', '--d-model', '32',
          '--layers', '1', '--heads', '2', '--max-len', '64', '--steps', str(steps),
          '--eval-every', '100', '--eval-batches', '1', '--log-every', '1', '--warmup-steps',
          '2', '--lr', '1e-2', '--accum-mode', mode, '--precision', precision,
          '--save-every', '1',
          # scan mode has no point between the calls of an update to save at
          '--save-every-micro', str(save_every_micro if mode != 'scan' else 0), '--keep', '3',
          '--no-progress']


def final_fingerprint(out: pathlib.Path):
  path = out / 'metrics.jsonl'
  if not path.exists():
    return None
  for line in reversed(path.read_text().splitlines()):
    record = json.loads(line)
    if record.get('kind') == 'summary':
      return record['params_fingerprint']
  return None


def run(argv, timeout=300):
  return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _saves_in_progress(out: pathlib.Path):
  """The save directories being written now, as (name, mtime) pairs: a tmp directory that an
  earlier killed attempt left behind stays there, so only pairs not seen at an attempt's start
  belong to it."""
  ckpt = out / 'checkpoints'
  try:
    return {(p.name, p.stat().st_mtime_ns) for p in ckpt.iterdir() if TMP in p.name}
  except OSError:  # the directory or an entry vanished (a commit renames it)
    return set()


def _has_checkpoint(out: pathlib.Path):
  ckpt = out / 'checkpoints'
  return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def _wait_or_kill(proc, out, deadline, nth_save=None, lag=0.0, poll=0.002):
  """Waits for `proc`; SIGKILLs it at `deadline` (seconds), or `lag` seconds after the
  `nth_save`-th save directory of its own appears. Returns None if it exited by itself, else
  whether the kill landed in a save (a save directory of its own was there after it died)."""
  start, before, seen = time.perf_counter(), _saves_in_progress(out), set()
  while proc.poll() is None:
    if nth_save is not None:
      seen |= _saves_in_progress(out) - before
      if len(seen) >= nth_save:
        time.sleep(lag)
        break
    if time.perf_counter() - start > deadline:
      break
    time.sleep(poll)
  else:
    return None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return bool(_saves_in_progress(out) - before)


def trial(rng: random.Random, workdir: pathlib.Path, corpus: str, mode: str, precision: str,
          reference: str, run_seconds: float, kind='random', max_attempts=12):
  """Kills attempts until one finishes; returns (identical, kills, in_save, attempts, fp).

  The first three attempts are always killed (`kind` says when: see the module docstring; a
  'first-save' trial kills its first attempt in the first save, later ones in a random save);
  later attempts half the time at a random moment, so every trial ends.
  """
  out = workdir / 'run'
  shutil.rmtree(out, ignore_errors=True)
  kills = in_save = 0
  for attempt in range(1, max_attempts + 1):
    argv = train_argv(out, corpus, mode, precision) + (['--resume'] if _has_checkpoint(out)
                                                       else [])
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if attempt <= 3 and kind != 'random':
      first = kind == 'first-save' and not _has_checkpoint(out)
      # in one of the attempt's first saves (an attempt that ends before it is not killed),
      # up to 30 ms after its tmp directory appears, so kills spread over the write
      killed = _wait_or_kill(proc, out, 300, nth_save=1 if first else rng.randint(1, 6),
                             lag=rng.uniform(0, 0.03))
    elif attempt <= 3 or (attempt < max_attempts and rng.random() < 0.5):
      killed = _wait_or_kill(proc, out, rng.uniform(0.5, run_seconds))
    else:
      proc.wait(timeout=300)
      killed = None
    if killed is not None:
      kills += 1
      in_save += killed
      continue
    if proc.returncode == 0:
      fp = final_fingerprint(out)
      return fp == reference, kills, in_save, attempt, fp
    err = proc.stderr.read()
    if 'no usable checkpoint' in err or 'no checkpoints/' in err:
      shutil.rmtree(out, ignore_errors=True)  # killed before its first commit: start over
      continue
    raise RuntimeError(f'attempt {attempt} failed (rc {proc.returncode}): {err[-2000:]}')
  return False, kills, in_save, max_attempts, None


def run_trials(trials: int, seed: int = 0, workdir=None, log=print, on_row=None):
  rng = random.Random(seed)
  workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix='kill_resume_'))
  corpus = tiny_corpus(workdir / 'corpus')
  references, durations = {}, {}
  rows = []
  for i in range(trials):
    mode, precision = MODES[i % len(MODES)]
    kind = KILLS[i % len(KILLS)]
    if (mode, precision) not in references:
      ref_out = workdir / f'reference-{mode}-{precision}'
      t0 = time.perf_counter()
      done = run(train_argv(ref_out, corpus, mode, precision))
      durations[mode, precision] = time.perf_counter() - t0
      if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
      references[mode, precision] = final_fingerprint(ref_out)
    identical, kills, in_save, attempts, fp = trial(
        rng, workdir / f'trial{i}', corpus, mode, precision, references[mode, precision],
        durations[mode, precision], kind=kind)
    rows.append((i, mode, precision, kind, kills, in_save, attempts, fp,
                 references[mode, precision], identical))
    if on_row:
      on_row(rows)
    log(f'trial {i}: {mode} {precision} {kind}: {kills} kill(s), {in_save} in a save, '
        f'{attempts} run(s), final {fp} vs {references[mode, precision]}: '
        f'{"identical" if identical else "DIFFERENT"}')
  identical = sum(r[-1] for r in rows)
  summary = (f'trials {trials}, identical {identical}, failed {trials - identical}')
  log(summary)
  return summary, rows


def table(rows, summary, a, seconds) -> str:
  lines = [
      '# Kill and resume: SIGKILL at random moments, bit-identical final params', '',
      f'Command: `python -m experiments.kill_resume --trials {a.trials} --seed {a.seed}` '
      f'({seconds:.0f} s on {os.cpu_count()} CPU cores, commit {_commit()}). '
      'Each trial: tiny model, K=4, a checkpoint after every call, SIGKILLs of the kind '
      'named (see the module docstring), `--resume` until done.', '',
      f'**{summary}**; {sum(r[4] for r in rows)} kills, of which '
      f'{sum(r[5] for r in rows)} landed while a checkpoint was being written '
      f'({sum(r[5] for r in rows if r[3] == "first-save")} in first-save trials).', '',
      *[f'- kind `{k}`: {sum(r[3] == k for r in rows)} trials, '
        f'{sum(r[9] for r in rows if r[3] == k)} identical, '
        f'{sum(r[4] for r in rows if r[3] == k)} kills, '
        f'{sum(r[5] for r in rows if r[3] == k)} in a save' for k in KILLS], '',
      '| trial | mode | precision | kill kind | kills | in a save | runs | final fingerprint '
      '| uninterrupted | same |',
      '|---|---|---|---|---|---|---|---|---|---|',
      *[f'| {i} | {m} | {p} | {kind} | {k} | {s} | {n} | {fp} | {ref} | '
        f'{"yes" if ok else "NO"} |' for i, m, p, kind, k, s, n, fp, ref, ok in rows], '']
  return '\n'.join(lines)


def _commit():
  done = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                        text=True)
  return done.stdout.strip() or 'unknown'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--trials', type=int, default=100)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--write', default=str(ROOT / 'benchmarks' / 'kill_resume.md'),
                 help='where to write the table ("" to skip)')
  a = p.parse_args(argv)
  if a.trials < 1:
    sys.stderr.write(f'error: --trials {a.trials} must be >= 1\n')
    return 2
  start = time.time()

  def write(rows, done=False):
    if not a.write:
      return
    identical = sum(r[-1] for r in rows)
    summary = f'trials {len(rows)}, identical {identical}, failed {len(rows) - identical}'
    if not done:
      summary += f' (in progress: {len(rows)} of {a.trials} trials so far)'
    pathlib.Path(a.write).write_text(table(rows, summary, a, time.time() - start))

  summary, rows = run_trials(a.trials, a.seed, on_row=write)
  write(rows, done=True)
  return 0 if summary.endswith('failed 0') else 1


if __name__ == '__main__':
  sys.exit(main())
