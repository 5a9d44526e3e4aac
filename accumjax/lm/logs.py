"""Logging helpers for the LM trainer: the banner, log lines, progress bar, metrics.jsonl, the
loss plot and the summary table. The only place in accumjax that prints.
"""

import json
import pathlib
import sys

from accumjax.checkpoint import json_safe


class MetricsWriter:
  """Appends one JSON object per line to `path` (None: writes nothing, e.g. not process 0).
  Strict JSON: a NaN or Inf value is written as null (`checkpoint.json_safe`)."""

  def __init__(self, path: pathlib.Path | None):
    self._f = None if path is None else open(path, 'a')  # noqa: SIM115 (closed in close())

  def write(self, record: dict):
    if self._f is not None:
      self._f.write(json.dumps(json_safe(record), allow_nan=False) + '\n')
      self._f.flush()

  def close(self):
    if self._f is not None:
      self._f.close()


class Logger:
  """Prints to `stream` above an optional tqdm progress bar over optimizer updates.

  `quiet=True` prints nothing (the processes other than process 0 of a multi-host run).
  """

  def __init__(self, stream=None, progress: bool | None = None, quiet: bool = False):
    self._stream, self.progress, self._bar, self.quiet = stream, progress, None, quiet

  @property
  def stream(self):
    return self._stream or sys.stdout  # looked up late, so redirection (and pytest) sees it

  def start_progress(self, total: int, initial: int = 0):
    if self.progress is False or self.quiet:
      return
    from tqdm import tqdm
    # progress=None: a bar only on a terminal, so logs and CI output stay clean.
    self._bar = tqdm(total=total, initial=initial, unit='upd', dynamic_ncols=True, leave=False,
                     disable=None if self.progress is None else False, file=sys.stderr)

  def advance(self, n: int = 1):
    if self._bar is not None:
      self._bar.update(n)

  def info(self, msg: str = ''):
    if self.quiet:
      return
    if self._bar is not None and not self._bar.disable:
      self._bar.write(msg, file=self.stream)
    else:
      print(msg, file=self.stream, flush=True)

  def table(self, title: str, rows: list[tuple[str, object]]):
    width = max(len(k) for k, _ in rows)
    self.info(title)
    for k, v in rows:
      self.info(f'  {k:<{width}}  {v}')

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def update_line(update, total, loss, ema, lr, accum, num_microbatches, tok_s, gnorm,
                skipped=0, nonfinite=0, loss_scale=None, b_simple=None) -> str:
  """One log line per logged update; `skipped`/`nonfinite` are the run's fault counters
  (updates skipped, non-finite micro-batches), `loss_scale` the float16 scale (if any),
  `b_simple` the smoothed gradient noise scale in tokens (if measured)."""
  ema = float('nan') if ema is None else ema
  return (f'update [{update}/{total}] loss {loss:.4f} ema {ema:.4f} lr {lr:.1e} '
          f'accum {accum}/{num_microbatches} tok/s {tok_s:.0f} gnorm {gnorm:.2f} '
          f'skipped {skipped} nonfinite {nonfinite}'
          + ('' if loss_scale is None else f' scale {loss_scale:g}')
          + ('' if b_simple is None else f' b_simple {b_simple:.4g}'))


def plot_losses(records: list[dict], path: pathlib.Path, title: str = ''):
  """Train and eval loss vs optimizer updates and vs tokens, as a PNG."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  train = [r for r in records if r['kind'] == 'train']
  evals = [r for r in records if r['kind'] == 'eval']
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, label in ((axes[0], 'update', 'optimizer updates'), (axes[1], 'tokens', 'tokens')):
    ax.plot([r[key] for r in train], [r['loss'] for r in train], lw=0.8, alpha=0.6,
            label='train (per update)')
    ax.plot([r[key] for r in train], [r['ema'] for r in train], lw=1.5, label='train (ema)')
    ax.plot([r[key] for r in evals], [r['loss'] for r in evals], 'o-', label='eval')
    ax.set_xlabel(label)
    ax.set_ylabel('loss (nats / token)')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_noise(records: list[dict], path: pathlib.Path, title: str = ''):
  """The gradient noise scale B_simple (per update and smoothed) against the batch the run
  uses (real tokens per update), vs tokens seen, as a PNG (log scale)."""
  import math

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  train = [r for r in records if r['kind'] == 'train' and 'b_simple' in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  raw = [(r['tokens'], r['b_simple']) for r in train
         if math.isfinite(r['b_simple']) and r['b_simple'] > 0]
  if raw:
    ax.plot(*zip(*raw, strict=True), '.', ms=3, alpha=0.35, label='B_simple, one update')
  ema = [(r['tokens'], r['b_simple_ema']) for r in train
         if math.isfinite(r['b_simple_ema']) and r['b_simple_ema'] > 0]
  if ema:
    ax.plot(*zip(*ema, strict=True), lw=2, label='B_simple, smoothed')
  ax.plot([r['tokens'] for r in train], [r['update_tokens'] for r in train], 'k--', lw=1.2,
          label='this run: real tokens per update')
  ax.set_yscale('log')
  ax.set_xlabel('tokens seen')
  ax.set_ylabel('tokens')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  ax.set_title(title or 'gradient noise scale (critical batch estimate) vs the batch used',
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
