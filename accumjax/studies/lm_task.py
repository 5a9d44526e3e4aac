"""The small LM task the studies share: the default corpus (the Python standard library's
sources), a byte-level model of a given size, its loss, and a held-out loss; and the figure
helper of their plots."""

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


def save_figure(fig, axes, path):
  """Grids every axis, lays the figure out, writes the PNG and closes it."""
  import matplotlib.pyplot as plt
  for ax in axes:
    ax.grid(alpha=0.3, which='both')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
