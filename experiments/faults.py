"""Fault drill: NaN / Inf injected into micro-batch j of a cycle, in every mode and policy,
next to what optax.MultiSteps does with the same fault.

    python -m experiments.faults            # ~1 minute on 2 CPU cores
    python -m experiments.faults --quick    # one fault position (j = 1), ~45 seconds

The main job's byte-level transformer (d_model 32, 1 layer) on the Python stdlib sources,
K = 4 micro-batches of 4 x 32 tokens, AdamW. For each mode x policy x fault (nan, inf) and
each j in 0..K-1: update 1 clean, update 2 with micro-batch j's loss times the fault, update 3
clean. Expected: skip_update/raise leave params and optimizer state bitwise unchanged by
update 2, and update 3 is bitwise the update a run without batch 2 makes; skip_microbatch
equals the big-batch update on the other three micro-batches (float32 rounding); counters
(skipped updates, non-finite micro-batches) 1/1 and 0/1; every cycle fires on its K-th
micro-batch. The optax anchors (multisteps only, plain mean gradients): no skip function ->
NaN params forever; skip_not_finite -> the update fires one micro-batch late, every later
cycle shifted; apply_if_finite inside -> a NaN accumulator that never clears. Also runs
`experiments.train --nonfinite-policy raise` once for its message. Writes
benchmarks/faults.md.
"""

import argparse
import contextlib
import io
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from accumjax import loop
from accumjax.checkpoint import fingerprint
from accumjax.config import NONFINITE_POLICIES, AccumConfig
from accumjax.lm import config as config_lib
from accumjax.lm import data as data_lib
from accumjax.lm.build import build_optimizer, make_loss_fn
from accumjax.lm.faults import with_faults
from accumjax.lm.model import make_lm
from accumjax.state import cycle_microbatches, init_train_state
from accumjax.step import jit_train_step, make_train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent
K, B, SEQ = 4, 4, 32
MODES = ('scan', 'multisteps', 'hybrid')
FAULTS = {'nan': np.nan, 'inf': np.inf}
CFG = config_lib.from_flat(dict(
    seq_len=SEQ, batch_size=B, d_model=32, num_layers=1, num_heads=2, max_len=64,
    grad_accum_steps=K, warmup_steps=1, steps=3, lr=1e-2))


def _batches(num=3):
  train, _ = data_lib.load_splits(None, SEQ)
  it = data_lib.RowIterator(train, 0)
  return [it.next_rows(K * B) for _ in range(num)]


def with_fault(batch, j=None, value=1.0, k=K):
  fault = np.ones(len(batch['mask']), np.float32)
  if j is not None:
    rows = len(fault) // k
    fault[j * rows:(j + 1) * rows] = value
  return dict(batch, fault=fault)


def _accum(mode, policy, k=K, b=B):
  return AccumConfig(num_microbatches=k, microbatch_size=b, mode=mode,
                     microbatches_per_call=2 if mode == 'hybrid' else None, nonfinite=policy)


def _runner(apply, params, accum):
  tx = build_optimizer(CFG, accum)[0]
  # Not donated: the drill compares states before and after each update.
  step = jit_train_step(make_train_step(with_faults(make_loss_fn(apply)), tx, accum),
                        donate=False)

  def run_update(state, batch):
    done = loop.run_update(step, state, loop.split_calls(batch, accum), accum)
    return done.state, jax.device_get(done.metrics)

  return init_train_state(params, tx, 0, accum), run_update


def _inner(state):
  """The optimizer state and the cycle's sums: what a skipped update must leave unchanged."""
  opt_state = state.opt_state
  inner = (opt_state.inner_opt_state, opt_state.acc_grads) \
      if isinstance(opt_state, optax.MultiStepsState) else opt_state
  return inner, None if state.cycle is None else state.cycle.sums


def _rel(a, b):
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                          strict=True))
  return (num / sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))) ** 0.5


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def accumjax_rows(apply, params, batches, positions):
  """One table row per mode x policy x fault, each checked at every j in `positions`."""
  b1, b2, b3 = batches
  # Big-batch reference for skip_microbatch: one micro-batch of the remaining 3 x B rows.
  big_state, big_update = _runner(apply, params, _accum('scan', 'skip_update', 1, K * B))
  big1, _ = big_update(big_state, with_fault(b1, k=1))
  rest_update = _runner(apply, params, _accum('scan', 'skip_update', 1, (K - 1) * B))[1]
  rows = []
  for mode in MODES:
    for policy in NONFINITE_POLICIES:
      state0, run_update = _runner(apply, params, _accum(mode, policy))
      s1, _ = run_update(state0, with_fault(b1))
      without_b2, _ = run_update(s1, with_fault(b3))
      for name, value in FAULTS.items():
        out = {'unchanged': True, 'next_finite': True, 'aligned': True, 'vs': 0.0,
               'counters': set(), 'first': []}
        for j in positions:
          s2, m2 = run_update(s1, with_fault(b2, j, value))
          s3, m3 = run_update(s2, with_fault(b3))
          out['unchanged'] &= (fingerprint((s2.params, _inner(s2)))
                               == fingerprint((s1.params, _inner(s1))))
          out['next_finite'] &= _finite(s3.params) and np.isfinite(m3['loss'])
          out['aligned'] &= (int(s3.update_step), cycle_microbatches(s3)) == (3, 0) and \
              bool(m2['updated'])
          out['counters'].add((int(s3.skipped_updates), int(s3.nonfinite_microbatches)))
          out['first'].append(int(m2['first_nonfinite']))
          if policy == 'skip_microbatch':
            keep = np.ones(K * B, bool)
            keep[j * B:(j + 1) * B] = False
            ref, _ = rest_update(big1, with_fault({k: v[keep] for k, v in b2.items()}, k=1))
            out['vs'] = max(out['vs'], _rel(s2.params, ref.params))
          else:
            out['vs'] = max(out['vs'], _rel(s3.params, without_b2.params))
        rows.append((mode, policy, name, out))
  return rows


def anchor_rows(apply, params, batches, positions):
  """optax.MultiSteps over per-micro-batch mean gradients, the three ways the issue names."""
  loss_fn = with_faults(make_loss_fn(apply))
  grad = jax.jit(jax.grad(lambda p, mb: (lambda s, w: s / w)(*loss_fn(p, mb, None))))
  adamw = lambda: build_optimizer(CFG, _accum('scan', 'skip_update'))[1]
  anchors = {
      'MultiSteps(adamw), no skip fn': lambda: optax.MultiSteps(
          optax.adamw(adamw(), b2=0.95, weight_decay=0.1), K),
      'MultiSteps(..., should_skip_update_fn=skip_not_finite)': lambda: optax.MultiSteps(
          optax.adamw(adamw(), b2=0.95, weight_decay=0.1), K,
          should_skip_update_fn=optax.skip_not_finite),
      'MultiSteps(apply_if_finite(adamw, 3))': lambda: optax.MultiSteps(
          optax.apply_if_finite(optax.adamw(adamw(), b2=0.95, weight_decay=0.1), 3), K),
  }
  rows = []
  for label, make in anchors.items():
    tx = make()
    update = jax.jit(tx.update)  # compiled once per anchor: the fault is data
    for name, value in FAULTS.items():
      outcomes = set()
      for j in positions:
        state, p = tx.init(params), params
        fires, after1, after2, nan_acc = [], None, None, False
        mbs = [with_fault(b, j if i == 1 else None, value) for i, b in enumerate(batches)]
        mbs = [{k: v[m * B:(m + 1) * B] for k, v in b.items()} for b in mbs for m in range(K)]
        for i, mb in enumerate(mbs * 2):  # six cycles' worth: 3 batches, twice
          g = grad(p, mb)
          before = int(state.gradient_step)
          u, state = update(g, state, p)
          p = optax.apply_updates(p, u)
          if int(state.gradient_step) > before:
            fires.append(i + 1)
          if i + 1 == K:
            after1 = p
          if i + 1 == 2 * K:
            after2 = p
          nan_acc |= not _finite(state.acc_grads)
        outcomes.add((
            'NaN' if not _finite(after2) else
            'unchanged' if fingerprint(after2) == fingerprint(after1) else 'updated',
            _finite(p), tuple(fires), nan_acc))
      rows.append((label, name, outcomes))
  return rows


def raise_message():
  from experiments import train as train_cli
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    rc = train_cli.main([
        '--seq-len', str(SEQ), '--batch-size', str(B), '--grad-accum-steps', str(K),
        '--d-model', '32', '--layers', '1', '--heads', '2', '--max-len', '64', '--steps', '3',
        '--eval-batches', '1', '--save-every', '0', '--accum-mode', 'multisteps',
        '--nonfinite-policy', 'raise', '--inject-faults', '2:1:inf',
        '--out', f'/tmp/accumjax-faults-{time.time_ns()}'])
  return rc, err.getvalue().strip()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true', help='only j = 1')
  p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'faults.md'))
  args = p.parse_args(argv)
  start = time.time()
  positions = [1] if args.quick else list(range(K))
  apply, params = make_lm(CFG.model, seed=0)
  batches = _batches()
  ours = accumjax_rows(apply, params, batches, positions)
  anchors = anchor_rows(apply, params, batches, positions)
  rc, message = raise_message()
  yes = lambda b: 'yes' if b else '**no**'
  lines = [
      '# Injected faults and outcomes', '',
      f'Command: `python -m experiments.faults{" --quick" if args.quick else ""}` '
      f'({time.time() - start:.0f} s on this machine). Main-job transformer (d_model 32, 1 '
      f'layer), stdlib text, K={K} micro-batches of {B} x {SEQ} tokens, AdamW. Update 1 clean, '
      f'update 2 with micro-batch j\'s loss times the fault (j = '
      f'{", ".join(map(str, positions))}: every row holds for each), update 3 clean.', '',
      '## accumjax', '',
      '"Unchanged" compares params and optimizer state (inner state and accumulator) after '
      'update 2 with those after update 1, bitwise (sha256). "vs reference": skip_update and '
      'raise, params after update 3 against a run that never saw batch 2 (0 = bitwise); '
      'skip_microbatch, params after update 2 against one big-batch update on the other three '
      'micro-batches. Counters after update 3: (skipped updates, non-finite micro-batches).', '',
      '| mode | policy | fault | update 2 skipped, state unchanged | update 3 finite | '
      'counters | first bad micro-batch reported | cycle aligned | vs reference |',
      '|---|---|---|---|---|---|---|---|---|']
  for mode, policy, name, o in ours:
    skipped = policy != 'skip_microbatch'
    lines.append(
        f'| {mode} | {policy} | {name} | '
        f'{(yes(o["unchanged"]) + " (bitwise)") if skipped else "no: applied, bad one dropped"}'
        f' | {yes(o["next_finite"])} | {", ".join(map(str, sorted(o["counters"])))} | '
        f'{"= j" if o["first"] == positions else o["first"]} | {yes(o["aligned"])} | '
        f'{o["vs"]:.1e} |')
  lines += [
      '', f'`raise` on device is skip_update; the training loop then stops (exit {rc}):', '',
      f'    {message}', '',
      '## optax.MultiSteps anchors (multisteps, per-micro-batch mean gradients)', '',
      'The same three batches, twice (24 micro-batches: updates due after 4, 8, ..., 24). '
      '"After cycle 2": params after micro-batch 8.', '',
      '| optimizer | fault | after cycle 2 | params finite at the end | updates fired after '
      'micro-batch | accumulator ever NaN |', '|---|---|---|---|---|---|']
  for label, name, outcomes in anchors:
    for after2, finite, fires, nan_acc in sorted(outcomes, key=str):
      lines.append(f'| {label} | {name} | {after2} | {yes(finite)} | '
                   f'{", ".join(map(str, fires)) or "none"} | {"yes" if nan_acc else "no"} |')
  if len(positions) > 1:
    lines.append('')
    lines.append('(Rows that differ by j are listed once per distinct outcome.)')
  text = '\n'.join(lines) + '\n'
  print(text)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
