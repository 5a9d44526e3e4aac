"""Fixed K vs a K ramp vs auto K (from the gradient noise scale), at the same token budget.

    python -m experiments.batch_ramp            # ~10 minutes on 2 CPU cores (default model)
    python -m experiments.batch_ramp --quick    # ~1 minute (CI smoke: a tiny model)

The default model and corpus of `experiments.train` (micro-batch 8 x 128 tokens), Adam with a
constant learning rate after a short warmup (so that runs of different lengths in updates get
the same rate schedule per token), and three ways to choose K per update:

- fixed:  K = 4 throughout (the main job's batch);
- ramp:   `accumjax.schedules.parse_k_schedule("0:2,60:4,150:8")`;
- auto:   `accumjax.schedules.auto_k` on the smoothed B_simple (ratio of EMAs of tr(Sigma)
          and |G|^2, as the trainer's --grad-accum-steps auto), K in {2, 4, ..., 32}, at most
          one change per 10 updates.

Ramp and auto scale the learning rate with sqrt(K / first K) (`lr_batch_scaling='sqrt'`, the
rule for Adam). Every run stops at the same number of training tokens (padding included);
each update is the exact big batch of its micro-batches. Reported: updates taken, final
held-out loss, loss vs tokens and vs updates (benchmarks/batch_ramp.md and .png).
"""

import math
import time

import numpy as np

from accumjax.noise import SmoothedNoiseScale
from accumjax.studies.lm_task import make_task
from experiments import lm_task

SETTINGS = {
    'full': dict(model=dict(d_model=128, num_layers=4, num_heads=4), seq=128, micro=8,
                 budget=1_200_000, eval_every_tokens=100_000, lr=3e-3, ramp='0:2,60:4,150:8',
                 fixed=4, auto_max=32),
    'quick': dict(model=dict(d_model=32, num_layers=1, num_heads=2), seq=32, micro=4,
                  budget=40_000, eval_every_tokens=10_000, lr=1e-2, ramp='0:2,10:4,20:8',
                  fixed=4, auto_max=8),
}
NOISE_EMA, DWELL = 0.9, 10


def run_plan(s: dict, plan: str, setup) -> dict:
  import jax
  import optax

  import accumjax
  from accumjax import schedules
  from accumjax.lm import data
  train, held_out_eval, params, loss_fn = setup
  ramp = schedules.parse_k_schedule(s['ramp']) if plan == 'ramp' else None
  allowed = tuple(2**i for i in range(1, 7) if 2**i <= s['auto_max'])
  max_k = {'fixed': s['fixed'], 'ramp': ramp.max_k if ramp else 0, 'auto': max(allowed)}[plan]
  first_k = {'fixed': s['fixed'], 'ramp': ramp.at(0) if ramp else 0, 'auto': allowed[0]}[plan]
  config = accumjax.AccumConfig(
      num_microbatches=max_k, microbatch_size=s['micro'], seq_len=s['seq'], mode='scan',
      noise_stats=True, lr_batch_scaling='none' if plan == 'fixed' else 'sqrt',
      base_num_microbatches=first_k)
  tx = accumjax.accumulating_optimizer(
      optax.chain(optax.clip_by_global_norm(1.0),
                  optax.adam(optax.linear_schedule(0.0, s['lr'], 20))), config)
  step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config))
  state = accumjax.init_train_state(params, tx, 0, config)
  rows = data.RowIterator(train, 0)
  tokens_per_mb = s['micro'] * s['seq']
  k, k_since, noise, loss_ema = first_k, 0, SmoothedNoiseScale(NOISE_EMA), None
  records, evals, seen, next_eval, update = [], [], 0, s['eval_every_tokens'], 0
  while seen < s['budget']:
    if plan == 'ramp':
      k = ramp.at(update)
    batch = rows.next_rows(k * s['micro'])
    done = accumjax.run_update(step, state, [batch], config, num_microbatches=k)
    state, m = done.state, jax.device_get(done.metrics)
    update += 1
    seen += k * tokens_per_mb
    loss = float(m['loss'])
    loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
    b_simple = noise.update(m)
    records.append({'update': update, 'tokens': seen, 'k': k, 'loss': loss,
                    'loss_ema': loss_ema, 'b_simple': b_simple})
    if plan == 'auto' and update - k_since >= DWELL:
      real_per_mb = float(m['weight']) / k
      new = schedules.auto_k(b_simple, real_per_mb, k, allowed)
      if new != k:
        k, k_since = new, update
    if seen >= next_eval or seen >= s['budget']:
      evals.append({'update': update, 'tokens': seen, 'loss': held_out_eval(state.params)})
      next_eval += s['eval_every_tokens']
  return {'plan': plan, 'records': records, 'evals': evals, 'programs': step._cache_size()}


def _setup(s):
  task = make_task(s['model'], s['seq'], eval_rows=32, eval_batches=4)
  return task.train, task.held_out_loss, task.params, task.loss_fn


def main(argv=None):
  a = lm_task.parse_args(__doc__, argv)
  s = SETTINGS['quick' if a.quick else 'full']
  start = time.time()
  setup = _setup(s)
  results = []
  for plan in ('fixed', 'ramp', 'auto'):
    r = run_plan(s, plan, setup)
    results.append(r)
    last = r['records'][-1]
    print(f'{plan:>5}: {last["update"]} updates, {last["tokens"]:,} tokens, final held-out '
          f'loss {r["evals"][-1]["loss"]:.4f}', flush=True)
  text = report(s, results, time.time() - start, a.quick)
  print(text)
  out = lm_task.write_report(text, 'batch_ramp', a)
  plot(results, out.with_suffix('.png'))
  return 0


def report(s, results, seconds, quick) -> str:
  lines = [
      '# Fixed K vs ramp vs auto K, at the same token budget', '',
      f'Command: `python -m experiments.batch_ramp{" --quick" if quick else ""}` '
      f'({seconds / 60:.1f} min on 2 CPU cores). Model {s["model"]}, seq {s["seq"]}, '
      f'micro-batch {s["micro"]}; Adam lr {s["lr"]} (20 warmup updates, then constant; ramp '
      f'and auto x sqrt(K / first K)); budget {s["budget"]:,} tokens; ramp {s["ramp"]}; auto '
      f'K from the smoothed B_simple, K <= {s["auto_max"]}.', '',
      '| plan | updates | K used (updates at each K) | scan programs | final held-out loss | '
      'final train loss (ema) |', '|---|---|---|---|---|---|']
  for r in results:
    ks = [x['k'] for x in r['records']]
    used = ', '.join(f'{k}: {ks.count(k)}' for k in sorted(set(ks)))
    lines.append(f'| {r["plan"]} | {len(ks)} | {used} | {r["programs"]} | '
                 f'{r["evals"][-1]["loss"]:.4f} | {r["records"][-1]["loss_ema"]:.4f} |')
  auto = next(r for r in results if r['plan'] == 'auto')
  b = [x['b_simple'] for x in auto['records'] if math.isfinite(x['b_simple'])]
  if b:
    lines += ['', f'B_simple in the auto run (smoothed, tokens): {b[0]:,.0f} at the start, '
                  f'{np.median(b):,.0f} median, {b[-1]:,.0f} at the end.']
  best = min(results, key=lambda r: r['evals'][-1]['loss'])
  lines += ['', f'Lowest final held-out loss: **{best["plan"]}**.']
  return '\n'.join(lines) + '\n'


def plot(results, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for r in results:
    rec, ev = r['records'], r['evals']
    for ax, key in ((axes[0], 'tokens'), (axes[1], 'update')):
      line, = ax.plot([x[key] for x in rec], [x['loss_ema'] for x in rec], lw=1.2,
                      label=f'{r["plan"]} (train ema)')
      ax.plot([x[key] for x in ev], [x['loss'] for x in ev], 'o--', color=line.get_color(),
              ms=3, lw=0.8, label=f'{r["plan"]} (held-out)')
    axes[2].plot([x['tokens'] for x in rec], [x['k'] for x in rec], label=r['plan'])
  axes[0].set_xlabel('tokens')
  axes[1].set_xlabel('optimizer updates')
  for ax in axes[:2]:
    ax.set_ylabel('loss (nats / token)')
    ax.set_ylim(top=min(4.5, ax.get_ylim()[1]))
  axes[2].set_xlabel('tokens')
  axes[2].set_ylabel('K (micro-batches per update)')
  axes[2].set_yscale('log', base=2)
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  raise SystemExit(main())
