"""Reliability: SIGKILL the real `experiments.train` at random moments, resume until it
finishes, and check the final params are bit-identical to an uninterrupted run.

    python -m experiments.kill_resume --trials 50     # ~15 minutes on 2 CPU cores

Each trial picks a mode (multisteps / hybrid / scan) and precision (fp32 / bf16), runs a tiny
model on a few stdlib files with a checkpoint after every call (so kills often land while an
async save is being written, and mid-cycle), kills each attempt after a random delay, and
resumes with --resume until a run exits 0. Expected result: `trials N, identical N, failed 0`.
Writes the table to benchmarks/kill_resume.md.
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


def trial(rng: random.Random, workdir: pathlib.Path, corpus: str, mode: str, precision: str,
          reference: str, run_seconds: float, max_attempts=12):
  """Kills attempts at random times until one finishes; returns (identical, kills, attempts).

  The first three attempts always get a kill timer, uniform over an uninterrupted run's
  duration (start-up included); later ones half the time, so every trial ends.
  """
  out = workdir / 'run'
  shutil.rmtree(out, ignore_errors=True)
  kills = 0
  for attempt in range(1, max_attempts + 1):
    has_ckpt = (out / 'checkpoints').is_dir() and any(
        p.name.isdigit() for p in (out / 'checkpoints').iterdir())
    argv = train_argv(out, corpus, mode, precision) + (['--resume'] if has_ckpt else [])
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if attempt <= 3 or (attempt < max_attempts and rng.random() < 0.5):
      try:
        proc.wait(timeout=rng.uniform(0.5, run_seconds))
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        continue
    else:
      proc.wait(timeout=300)
    if proc.returncode == 0:
      fp = final_fingerprint(out)
      return fp == reference, kills, attempt, fp
    err = proc.stderr.read()
    if 'no usable checkpoint' in err or 'no checkpoints/' in err:
      shutil.rmtree(out, ignore_errors=True)  # killed before its first commit: start over
      continue
    raise RuntimeError(f'attempt {attempt} failed (rc {proc.returncode}): {err[-2000:]}')
  return False, kills, max_attempts, None


def run_trials(trials: int, seed: int = 0, workdir=None, log=print):
  rng = random.Random(seed)
  workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix='kill_resume_'))
  corpus = tiny_corpus(workdir / 'corpus')
  references, durations = {}, {}
  rows = []
  for i in range(trials):
    mode, precision = MODES[i % len(MODES)]
    if (mode, precision) not in references:
      ref_out = workdir / f'reference-{mode}-{precision}'
      t0 = time.perf_counter()
      done = run(train_argv(ref_out, corpus, mode, precision))
      durations[mode, precision] = time.perf_counter() - t0
      if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
      references[mode, precision] = final_fingerprint(ref_out)
    identical, kills, attempts, fp = trial(rng, workdir / f'trial{i}', corpus, mode, precision,
                                           references[mode, precision],
                                           durations[mode, precision])
    rows.append((i, mode, precision, kills, attempts, fp, references[mode, precision],
                 identical))
    log(f'trial {i}: {mode} {precision}: {kills} kill(s), {attempts} run(s), '
        f'final {fp} vs {references[mode, precision]}: '
        f'{"identical" if identical else "DIFFERENT"}')
  identical = sum(r[-1] for r in rows)
  summary = f'trials {trials}, identical {identical}, failed {trials - identical}'
  log(summary)
  return summary, rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--trials', type=int, default=50)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--write', default=str(ROOT / 'benchmarks' / 'kill_resume.md'),
                 help='where to write the table ("" to skip)')
  a = p.parse_args(argv)
  if a.trials < 1:
    sys.stderr.write(f'error: --trials {a.trials} must be >= 1\n')
    return 2
  start = time.time()
  summary, rows = run_trials(a.trials, a.seed)
  if a.write:
    lines = [
        '# Kill and resume: SIGKILL at random moments, bit-identical final params', '',
        f'Command: `python -m experiments.kill_resume --trials {a.trials} --seed {a.seed}` '
        f'({time.time() - start:.0f} s on {os.cpu_count()} CPU cores). Each trial: tiny model, '
        'K=4, a checkpoint after every call, random SIGKILLs, `--resume` until done.', '',
        f'**{summary}**', '',
        '| trial | mode | precision | kills | runs | final fingerprint | uninterrupted | same |',
        '|---|---|---|---|---|---|---|---|',
        *[f'| {i} | {m} | {p} | {k} | {n} | {fp} | {ref} | {"yes" if ok else "NO"} |'
          for i, m, p, k, n, fp, ref, ok in rows], '']
    pathlib.Path(a.write).write_text('\n'.join(lines))
  return 0 if summary.endswith('failed 0') else 1


if __name__ == '__main__':
  sys.exit(main())
