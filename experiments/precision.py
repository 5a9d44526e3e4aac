"""Accumulation error vs K: bf16 gradients summed in bf16, in compensated bf16, and in float32.

    python -m experiments.precision      # ~15 seconds on 2 CPU cores

Computes K real micro-batch gradients of the main job's model (small size, bf16 compute, each
gradient rounded to bf16 as a bf16 training step would hand it over), then sums them three ways
and compares with the float64 sum of the very same bf16 values. Expected: bf16 accumulation's
error grows with K (each add rounds to 8 bits of mantissa), Kahan-compensated bf16 stays near
bf16's resolution, float32 stays ~1e-7 whatever K. Writes benchmarks/precision.md.
"""

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import accumjax
from accumjax.lm import data, model
from accumjax.lm.build import make_loss_fn

KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROOT = pathlib.Path(__file__).resolve().parent.parent


def compensated_add(total, compensation, x):
  """One step of Kahan summation in the dtype of `total`: returns (total, compensation).

  Recovers most of what a low-precision accumulator loses to rounding.
  """
  y = x.astype(total.dtype) - compensation
  t = total + y
  return t, (t - total) - y


def microbatch_grads(num, seq_len=64, rows=4):
  apply, params = model.make_lm(model.ModelConfig(d_model=64, num_layers=2, num_heads=2,
                                                  max_len=seq_len))
  loss = accumjax.with_compute_dtype(make_loss_fn(apply), jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda p, b: loss(p, b, None)[0]))
  train, _ = data.load_splits(None, seq_len)
  it = data.RowIterator(train, 0)
  flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
  return [flat(grad(params, it.next_rows(rows))).astype(jnp.bfloat16) for _ in range(num)]


def errors(grads):
  ref = np.sum([np.asarray(g, np.float64) for g in grads], axis=0)
  bf16 = jnp.zeros_like(grads[0])
  comp_total, comp = jnp.zeros_like(grads[0]), jnp.zeros_like(grads[0])
  f32 = jnp.zeros(grads[0].shape, jnp.float32)
  for g in grads:
    bf16 = bf16 + g
    comp_total, comp = compensated_add(comp_total, comp, g)
    f32 = f32 + g.astype(jnp.float32)
  rel = lambda x: float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))
  return rel(bf16), rel(comp_total), rel(f32)


def main():
  start = time.time()
  grads = microbatch_grads(max(KS))
  rows = []
  for k in KS:
    e_bf16, e_comp, e_f32 = errors(grads[:k])
    rows.append((k, e_bf16, e_comp, e_f32))
    print(f'K={k:<4} bf16 {e_bf16:.2e}  compensated bf16 {e_comp:.2e}  float32 {e_f32:.2e}')
  text = '\n'.join([
      '# Accumulation precision: bf16 gradients summed three ways', '',
      f'Command: `python -m experiments.precision` ({time.time() - start:.0f} s). K real '
      f'micro-batch gradients ({grads[0].size:,} values each; main-job model, d_model 64, '
      '2 layers, bf16 compute, gradients rounded to bf16), summed in bf16, in Kahan-'
      'compensated bf16 (`experiments.precision.compensated_add`) and in float32 (what accumjax '
      'does), against the float64 sum of the same bf16 values. Relative error '
      '||sum - ref|| / ||ref||.', '',
      '| K | bf16 accumulator | compensated bf16 | float32 accumulator |', '|---|---|---|---|',
      *[f'| {k} | {a:.2e} | {b:.2e} | {c:.2e} |' for k, a, b, c in rows], ''])
  (ROOT / 'benchmarks' / 'precision.md').write_text(text)
  return rows


if __name__ == '__main__':
  main()
