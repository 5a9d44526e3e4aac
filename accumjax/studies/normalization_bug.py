"""The loss-normalisation bug measured: accumjax's token weighting against a mean of
micro-batch means and a sum divided by K, on padded text (gradient errors and training curves).
`python -m experiments.normalization_bug` runs it and says what to expect; docs/studies.md has
the findings.
"""

import math

import numpy as np

from accumjax.studies import lm_task

VARIANTS = ('token-weighted (accumjax)', 'mean of micro-batch means', 'sum / K')
SETTINGS = {
    'full': dict(model=dict(d_model=64, num_layers=2, num_heads=2), seq=128, rows=32,
                 ks=(1, 2, 4, 8, 16), batches=8, train_k=8, updates=150),
    'quick': dict(model=dict(d_model=32, num_layers=1, num_heads=2), seq=64, rows=16,
                  ks=(1, 4, 16), batches=2, train_k=4, updates=20),
}


def variant_grads(loss_fn, params, batch, k: int) -> dict:
  """The three estimates of the update's gradient from the same K micro-batches."""
  import jax

  import accumjax
  exact, _ = accumjax.accumulate_gradients(loss_fn, params, batch, num_microbatches=k)

  def sum_grad(mb):  # (S_j, w_j): d(summed token loss)/d params, and the token count
    return jax.grad(lambda p: loss_fn(p, mb, None), has_aux=True)(params)

  sums, weights = jax.lax.map(sum_grad, accumjax.split_microbatches(batch, k))
  mean_of_means = jax.tree.map(
      lambda x: (x / weights.reshape((k,) + (1,) * (x.ndim - 1))).mean(0), sums)
  sum_over_k = jax.tree.map(lambda x: x.sum(0) / k, sums)
  return dict(zip(VARIANTS, (exact, mean_of_means, sum_over_k), strict=True))


def rel_error(a, b) -> float:
  import jax
  import jax.numpy as jnp
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                           strict=True))
  den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
  return math.sqrt(num / den)


def direction_error(a, b) -> float:
  """sin of the angle between a and b: the error left after the best rescaling of a.

  In float64 on the host, as the rejection |a - (a.b / b.b) b| / |a|: `sqrt(1 - cos^2)` of
  float32 dot products has a floor of about 1e-4 (float32 rounding of cos near 1)."""
  import jax
  la = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)]
  lb = [np.asarray(y, np.float64).ravel() for y in jax.tree.leaves(b)]
  scale = sum(x @ y for x, y in zip(la, lb, strict=True)) / sum(y @ y for y in lb)
  rejection = sum(np.sum((x - scale * y) ** 2) for x, y in zip(la, lb, strict=True))
  return math.sqrt(rejection / sum(x @ x for x in la))


def layouts(task, s) -> dict:
  """{layout: [batch, ...]}: the same rows shuffled, sorted by length, and a packed stream."""
  from accumjax.lm import data
  rows = data.RowIterator(task.train, 0)
  shuffled = [rows.next_rows(s['rows']) for _ in range(s['batches'])]

  def by_length(b):
    order = np.argsort(-b['mask'].sum(1), kind='stable')
    return {k: v[order] for k, v in b.items()}

  packed_split, _ = data.load_splits(None, s['seq'], pack=True)
  packed_rows = data.RowIterator(packed_split, 0)
  return {'shuffled': shuffled, 'sorted by length': [by_length(b) for b in shuffled],
          'packed (no padding)': [packed_rows.next_rows(s['rows']) for _ in shuffled]}


def gradient_errors(task, s) -> list[dict]:
  import jax
  grads = jax.jit(lambda p, b, k: variant_grads(task.loss_fn, p, b, k), static_argnums=2)
  out = []
  for layout, batches in layouts(task, s).items():
    for k in s['ks']:
      errs = {v + key: [] for v in VARIANTS[1:] for key in ('', ' direction')}
      spread = []
      for b in batches:
        g = grads(task.params, b, k)
        for v in VARIANTS[1:]:
          errs[v].append(rel_error(g[v], g[VARIANTS[0]]))
          errs[v + ' direction'].append(direction_error(g[v], g[VARIANTS[0]]))
        w = b['mask'].reshape(k, -1).sum(1)
        spread.append(w.max() / max(w.min(), 1))
      out.append({'layout': layout, 'k': k, 'spread': float(np.median(spread)),
                  **{v: float(np.mean(e)) for v, e in errs.items()}})
  return out


def train_curves(task, s) -> dict:
  import jax
  import optax
  k = s['train_k']
  batches = layouts(task, dict(s, batches=s['updates']))['sorted by length']
  curves = {}
  for opt_name, opt in (('sgd', optax.sgd(0.5)), ('adam', optax.adam(3e-3))):
    for v in VARIANTS:
      @jax.jit
      def update(params, state, batch, v=v, opt=opt):
        g = variant_grads(task.loss_fn, params, batch, k)[v]
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

      params, state, losses = task.params, opt.init(task.params), []
      for i, b in enumerate(batches, start=1):
        params, state = update(params, state, b)
        if i % max(1, s['updates'] // 10) == 0:
          losses.append((i, task.held_out_loss(params)))
      curves[(opt_name, v)] = losses
  return curves


def report(s, errors, curves, seconds, quick) -> str:
  lines = [
      '# The loss-normalisation bug: token weighting vs mean of means vs sum / K', '',
      f'Command: `python -m experiments.normalization_bug{" --quick" if quick else ""}` '
      f'({seconds / 60:.1f} min on 2 CPU cores). Default corpus, seq {s["seq"]}, {s["rows"]} '
      f'rows per update, model {s["model"]}; errors averaged over {s["batches"]} batches.', '',
      '## Gradient error per update', '',
      'Relative error ||g - g_big|| / ||g_big||, and the direction error sin(angle(g, g_big)) '
      '(what is left after the best rescaling of g). The token-weighted sums match g_big to '
      'float32 rounding (tests/test_equivalence.py).', '',
      '| layout | K | median max/min tokens per micro-batch | mean of means: error | '
      'direction | sum / K: error | direction |', '|---|---|---|---|---|---|---|']
  for e in errors:
    m, k = VARIANTS[1], VARIANTS[2]
    lines.append(f'| {e["layout"]} | {e["k"]} | {e["spread"]:.2f} | {e[m]:.4f} | '
                 f'{e[m + " direction"]:.4f} | {e[k]:.1f} | {e[k + " direction"]:.4f} |')
  lines += ['', f'## Held-out loss after training (sorted layout, K = {s["train_k"]}, '
                f'{s["updates"]} updates)', '', '| optimizer | ' + ' | '.join(VARIANTS) + ' |',
            '|---|---|---|---|']
  for opt in ('sgd', 'adam'):
    lines.append(f'| {opt} | ' + ' | '.join(f'{curves[(opt, v)][-1][1]:.4f}' for v in VARIANTS)
                 + ' |')
  return '\n'.join(lines) + '\n'


def plot(errors, curves, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for layout in dict.fromkeys(e['layout'] for e in errors):
    rows = [e for e in errors if e['layout'] == layout]
    for v, style in zip(VARIANTS[1:], ('o-', 's--'), strict=True):
      axes[0].plot([e['k'] for e in rows], [max(e[v], 1e-9) for e in rows], style,
                   label=f'{v}, {layout}')
  axes[0].set_xscale('log', base=2)
  axes[0].set_yscale('log')
  axes[0].set_xlabel('K')
  axes[0].set_ylabel('||g - g_big|| / ||g_big||')
  axes[0].legend(fontsize=6)
  for ax, opt in ((axes[1], 'sgd'), (axes[2], 'adam')):
    for v in VARIANTS:
      pts = curves[(opt, v)]
      ax.plot([u for u, _ in pts], [x for _, x in pts], 'o-', ms=3, label=v)
    ax.set_xlabel('updates')
    ax.set_ylabel('held-out loss')
    ax.set_title(opt, fontsize=9)
    ax.legend(fontsize=7)
  lm_task.save_figure(fig, axes, path)
