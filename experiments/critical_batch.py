"""The critical batch, measured directly, against the gradient noise scale B_simple.

    python -m experiments.critical_batch            # ~10 minutes on 2 CPU cores
    python -m experiments.critical_batch --quick    # ~1 minute (CI smoke: 3 batches, 1 lr)

McCandlish et al. (2018) predict that the steps S and examples E needed to reach a given loss
trade off as (S / S_min - 1)(E / E_min - 1) = 1, i.e. S(B) = S_min + E_min / B, with a
critical batch B_crit = E_min / S_min; and that B_crit is close to the gradient noise scale
B_simple measured during training. Here, on a real task (a small byte-level LM on the default
corpus, the Python standard library's sources):

1. For effective batches B = b x K (micro-batch b = 4 sequences fixed, K = 1..64: K does the
   work), and a learning rate swept per batch (Adam; lr0 x sqrt(B / b) x {0.5, 1, 2}), train
   with a constant rate until the eval loss (a fixed held-out set, evaluated every ~64
   sequences of training) first reaches the target. S(B) is the best over the sweep.
2. Fit S = S_min + E_min / B (least squares in 1 / B): B_crit = E_min / S_min.
3. A run at K = 8 with noise statistics (`AccumConfig(noise_stats=True)`) gives B_simple in
   tokens, averaged (ratio of the means of tr(Sigma) and |G|^2) over the updates where the eval
   loss is within 0.25 of the target; converted to sequences by the mean real tokens per
   sequence.

Writes benchmarks/critical_batch.md (table, fit, ratio B_crit / B_simple, runtime) and
benchmarks/critical_batch.png. Whatever the ratio is, it is reported: the paper reports
agreement within about 2x, with B_simple usually the smaller.
"""

import math
import time

import numpy as np

from accumjax.studies.lm_task import make_task
from experiments import lm_task

MICRO = 4  # sequences per micro-batch
SEQ = 64
MODEL = dict(d_model=64, num_layers=2, num_heads=2)
LR0 = 2e-3  # at B = MICRO; scaled by sqrt(B / MICRO) as the sweep's centre
SETTINGS = {
    'full': dict(ks=(1, 2, 4, 8, 16, 32, 64), lr_factors=(0.5, 1.0, 2.0), target=2.6,
                 max_sequences=120_000),
    'quick': dict(ks=(1, 4, 16), lr_factors=(1.0,), target=3.3, max_sequences=12_000),
}


def train_to_target(setup, k: int, lr: float, target: float, max_sequences: int,
                    noise_stats: bool = False, seed: int = 0) -> dict:
  """Steps until the eval loss first reaches `target` (None if not within max_sequences),
  with the eval curve (and, with noise_stats, per-update tr(Sigma), |G|^2 and tokens)."""
  import jax
  import optax

  import accumjax
  from accumjax.lm import data
  train, params, loss_fn, eval_loss = setup
  b = MICRO * k
  config = accumjax.AccumConfig(num_microbatches=k, microbatch_size=MICRO, seq_len=SEQ,
                                noise_stats=noise_stats)
  sched = optax.linear_schedule(0.0, lr, 5)
  tx = accumjax.accumulating_optimizer(optax.adam(sched), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config))
  state = accumjax.init_train_state(params, tx, seed, config)
  rows = data.RowIterator(train, seed)
  every = max(1, 64 // b)
  curve, noise, reached = [], [], None
  for update in range(1, max_sequences // b + 1):
    state, m = step(state, rows.next_rows(b), last_call=True)
    if noise_stats:
      m = jax.device_get(m)
      noise.append((float(m['trace_sigma']), float(m['g_sq']), float(m['weight'])))
    if update % every == 0:
      loss = eval_loss(state.params)
      curve.append((update, loss))
      if reached is None and loss <= target:
        reached = update
        if not noise_stats:
          break
      if noise_stats and loss <= target - 0.25:
        break
  return {'k': k, 'batch': b, 'lr': lr, 'steps': reached, 'curve': curve, 'noise': noise}


def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
  """(S_min, E_min) from [(B, S)] by least squares of S = S_min + E_min / B."""
  x = np.array([1.0 / b for b, _ in points])
  y = np.array([s for _, s in points], float)
  a = np.stack([np.ones_like(x), x], axis=1)
  (s_min, e_min), *_ = np.linalg.lstsq(a, y, rcond=None)
  return float(s_min), float(e_min)


def b_simple_near(run: dict, target: float) -> tuple[float, int]:
  """B_simple (tokens) as ratio of the means of tr(Sigma) and |G|^2 over the updates whose
  last eval loss was within 0.25 of the target; and how many updates that was."""
  evals = dict(run['curve'])
  last, window = None, []
  for u, (trace, g_sq, _) in enumerate(run['noise'], start=1):
    last = evals.get(u, last)
    if last is not None and abs(last - target) <= 0.25 and math.isfinite(trace + g_sq):
      window.append((trace, g_sq))
  if not window:
    return math.nan, 0
  traces, gs = zip(*window, strict=True)
  return float(np.mean(traces) / np.mean(gs)), len(window)


def main(argv=None):
  a = lm_task.parse_args(__doc__, argv)
  s = SETTINGS['quick' if a.quick else 'full']
  start = time.time()
  setup = make_task(MODEL, SEQ, eval_rows=64, eval_batches=2)
  train = setup.train
  tokens_per_seq = float(np.mean(np.minimum(train.lengths, SEQ)))
  runs = []
  for k in s['ks']:
    for f in s['lr_factors']:
      lr = LR0 * math.sqrt(k) * f
      r = train_to_target(setup, k, lr, s['target'], s['max_sequences'])
      runs.append(r)
      print(f'B={r["batch"]:4d} (K={k:2d}) lr {lr:.2e}: '
            f'{r["steps"] if r["steps"] else "not reached"} updates', flush=True)
  best = {}
  for r in runs:
    if r['steps'] and (r['batch'] not in best or r['steps'] < best[r['batch']]['steps']):
      best[r['batch']] = r
  points = sorted((b, r['steps']) for b, r in best.items())
  s_min, e_min = fit(points) if len(points) >= 2 else (math.nan, math.nan)
  b_crit = e_min / s_min if s_min > 0 else math.nan
  noise_run = train_to_target(setup, 8, LR0 * math.sqrt(8), s['target'],
                              s['max_sequences'], noise_stats=True)
  b_simple_tokens, window = b_simple_near(noise_run, s['target'])
  b_simple = b_simple_tokens / tokens_per_seq
  seconds = time.time() - start
  text = report(s, runs, best, points, s_min, e_min, b_crit, b_simple_tokens, b_simple,
                window, tokens_per_seq, seconds, a.quick)
  print(text)
  out = lm_task.write_report(text, 'critical_batch', a)
  plot(points, s_min, e_min, b_crit, b_simple, out.with_suffix('.png'))
  return 0


def report(s, runs, best, points, s_min, e_min, b_crit, b_simple_tokens, b_simple, window,
           tokens_per_seq, seconds, quick) -> str:
  lines = [
      '# Critical batch: measured directly vs the gradient noise scale', '',
      f'Command: `python -m experiments.critical_batch{" --quick" if quick else ""}` '
      f'({seconds / 60:.1f} min on 2 CPU cores). Task: byte-level LM ({MODEL}, seq {SEQ}) on '
      'the default corpus (stdlib sources); Adam, constant lr after 5 warmup updates; target: '
      f'held-out loss <= {s["target"]}. Micro-batch {MICRO} sequences, B = {MICRO} x K. '
      f'Mean real tokens per sequence: {tokens_per_seq:.1f}.', '',
      '| B (sequences) | K | lr | updates to target |', '|---|---|---|---|']
  for r in runs:
    mark = ' (best)' if best.get(r['batch']) is r else ''
    lines.append(f'| {r["batch"]} | {r["k"]} | {r["lr"]:.2e} | '
                 f'{r["steps"] if r["steps"] else "not reached"}{mark} |')
  edges = []
  for b, r in sorted(best.items()):
    lrs = sorted(x['lr'] for x in runs if x['batch'] == b)
    if len(lrs) > 1 and r['lr'] in (lrs[0], lrs[-1]):
      edges.append(f'B = {b} ({"largest" if r["lr"] == lrs[-1] else "smallest"} lr)')
  if edges:
    lines += ['', f'The best lr was at the edge of the sweep for {", ".join(edges)}: the '
                  'optimum may lie beyond it, so S there is an upper bound.']
  lines += [
      '', f'Fit S = S_min + E_min / B over the best runs ({len(points)} batches): '
      f'S_min = {s_min:.1f} updates, E_min = {e_min:.0f} sequences, '
      f'**B_crit = E_min / S_min = {b_crit:.1f} sequences**.', '',
      f'B_simple from the K = 8 run with noise statistics, over the {window} updates whose eval '
      f'loss was within 0.25 of the target: {b_simple_tokens:.0f} tokens = '
      f'**{b_simple:.1f} sequences**.', '',
      f'**B_crit / B_simple = {b_crit / b_simple:.2f}**' if b_simple > 0 else
      '**B_simple was not measured** (no update in the window)', '']
  return '\n'.join(lines) + '\n'


def plot(points, s_min, e_min, b_crit, b_simple, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  if points:
    steps = np.array([s for _, s in points], float)
    examples = np.array([b * s for b, s in points], float)
    ax.plot(steps, examples, 'o', label='measured (best lr per batch)')
    for (b, s), e in zip(points, examples, strict=True):
      ax.annotate(f'B={b}', (s, e), textcoords='offset points', xytext=(4, 4), fontsize=7)
    if math.isfinite(s_min) and s_min > 0 and e_min > 0:
      bs = np.geomspace(min(b for b, _ in points) / 2, max(b for b, _ in points) * 2, 100)
      ax.plot(s_min + e_min / bs, (s_min + e_min / bs) * bs, '-', lw=1,
              label=f'fit: S_min {s_min:.0f}, E_min {e_min:.0f}')
      for b, style, name in ((b_crit, 'k--', 'B_crit'), (b_simple, 'r:', 'B_simple')):
        if math.isfinite(b) and b > 0:
          s = s_min + e_min / b
          ax.plot([s], [s * b], style[0] + 'x', ms=10, label=f'{name} = {b:.1f}')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('optimizer updates to target (S)')
  ax.set_ylabel('examples (sequences) to target (E = B S)')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  ax.set_title('steps vs examples to reach the target loss', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  raise SystemExit(main())
