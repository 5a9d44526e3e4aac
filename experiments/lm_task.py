"""The small LM task the batch-size experiments share: the default corpus (the Python standard
library's sources), a byte-level model of a given size, its loss, and a held-out loss."""

import argparse
import pathlib
from typing import NamedTuple


class LMTask(NamedTuple):
  train: object  # data.Split of the training rows
  params: object
  loss_fn: object  # (params, batch, rng) -> (loss_sum, weight)
  held_out_loss: object  # params -> token-weighted loss on a fixed held-out set


def make_task(dims: dict, seq_len: int, eval_rows: int, eval_batches: int) -> LMTask:
  import jax

  from accumjax.lm import data, model
  from accumjax.lm.build import make_loss_fn
  train, held_out = data.load_splits(None, seq_len, pack=False)
  apply, params = model.make_lm(model.ModelConfig(max_len=seq_len, **dims), seed=0)
  loss_fn = make_loss_fn(apply)
  evals = [jax.device_put(b) for b in data.eval_batches(held_out, eval_rows, eval_batches)]
  sums = jax.jit(lambda p, b: loss_fn(p, b, None))

  def held_out_loss(p):
    out = [sums(p, b) for b in evals]
    return float(sum(x for x, _ in out) / sum(w for _, w in out))

  return LMTask(train, params, loss_fn, held_out_loss)


def parse_args(doc: str, argv) -> argparse.Namespace:
  """--quick and --out, the flags every batch experiment has."""
  p = argparse.ArgumentParser(description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help='the small CI variant')
  p.add_argument('--out', default=None, help='markdown path (default benchmarks/...)')
  return p.parse_args(argv)


def write_report(text: str, name: str, args) -> pathlib.Path:
  """Writes the markdown table to `--out` or benchmarks/NAME[-quick].md; returns its path (the
  plot goes beside it, `.with_suffix('.png')`)."""
  root = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'
  out = pathlib.Path(args.out) if args.out else root / f'{name}{"-quick" if args.quick else ""}.md'
  out.write_text(text)
  return out


def save_figure(fig, axes, path):
  """Grids every axis, lays the figure out, writes the PNG and closes it."""
  import matplotlib.pyplot as plt
  for ax in axes:
    ax.grid(alpha=0.3, which='both')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
