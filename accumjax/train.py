"""Training a byte-level language model with accumulation: `train_and_evaluate(cfg, out_dir)`.

The library side of `python -m experiments.train`: builds data, model, optimizer and the one
accumjax train step from a flat `TrainConfig` (runconfig.py), resumes (resume.py), runs the
loop with checkpoints, writes `config.json`, `metrics.jsonl` and `loss.png` to `out_dir`, and
returns a summary dict. No flag parsing here.

Non-finite values never reach the params (see optim.py); the loop only reads the counters:
under --nonfinite-policy raise it stops at the first update with a non-finite micro-batch,
and under any policy after --max-consecutive-skips skipped updates in a row, with a
`NonFiniteError` naming the update and micro-batch. It does not save at that point: the
state is unpoisoned but the newest checkpoint is the one to resume from.
"""

import dataclasses
import json
import math
import pathlib
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from accumjax import data as data_lib
from accumjax import logs, parallel
from accumjax.checkpoint import Checkpointer
from accumjax.config import describe
from accumjax.core import ConfigError
from accumjax.losses import token_cross_entropy
from accumjax.model import make_lm, num_params
from accumjax.planner import format_bytes
from accumjax.precision import cast_floats
from accumjax.resume import resume_state, trim_metrics
from accumjax.runconfig import (  # noqa: F401 (re-exported: the run's settings live there)
  ON_CONFIG_CHANGE,
  OPTIMIZERS,
  PRECISIONS,
  SCHEDULES,
  TrainConfig,
  build_optimizer,
  fault_rows,
  make_loss_fn,
  model_config,
  parse_faults,
  plan_for_budget,
  validate,
)
from accumjax.step import init_train_state, make_train_step


class NonFiniteError(FloatingPointError):
  """The run stopped for non-finite values ('raise' policy, or too many skips in a row)."""


def train_and_evaluate(cfg: TrainConfig, out_dir, log: logs.Logger | None = None, *,
                       resume=None, on_config_change: str = 'refuse',
                       should_stop=lambda: False) -> dict:
  """Trains until `cfg.steps` optimizer updates; returns the summary.

  Args:
    cfg: the run's settings.
    out_dir: where config.json, metrics.jsonl, loss.png and checkpoints/ go.
    log: a logs.Logger (default: plain prints, no progress bar).
    resume: None (fresh run), True or 'latest' (newest good checkpoint in out_dir), or a step.
    on_config_change: 'refuse' (default) or 'flush': what to do when the accumulation setup
      changed and the checkpoint is mid-cycle (flush applies the partial cycle first).
    should_stop: polled after every call; when it returns True (a preemption signal), the run
      saves a checkpoint where it is (mid-cycle included) and returns with 'preempted': True.
  """
  main_process = jax.process_index() == 0  # logs, metrics and plots; every process trains
  log = (log or logs.Logger(progress=False)) if main_process else logs.Logger(quiet=True)
  mesh = parallel.make_mesh(parallel.parse_mesh(cfg.mesh))
  plan = None
  if cfg.memory_budget is not None:
    cfg, plan = plan_for_budget(cfg, mesh.size)
  accum = validate(cfg, mesh.size)
  if jax.process_count() > 1:  # a preemption must stop every process at the same call
    local_stop = should_stop
    should_stop = lambda: bool(multihost_utils.process_allgather(np.array(local_stop())).any())
  if on_config_change not in ON_CONFIG_CHANGE:
    raise ConfigError(f'on_config_change={on_config_change!r}; allowed: refuse, flush.')
  out = pathlib.Path(out_dir)
  if resume is not None and not (out / 'checkpoints').is_dir():
    raise ConfigError(f'--resume: no checkpoints/ in {out} to resume from.')
  train_split, eval_split = data_lib.load_splits(cfg.data, cfg.seq_len, cfg.pack)
  apply, params = make_lm(model_config(cfg), seed=cfg.seed)
  loss_fn = make_loss_fn(apply)
  tx, schedule = build_optimizer(cfg, accum)
  saving = bool(cfg.save_every or cfg.save_every_micro)
  ckpt = Checkpointer(out / 'checkpoints', keep=cfg.keep) if saving or resume is not None \
      else None  # created on demand if a run without saves is preempted
  rows = data_lib.RowIterator(train_split, cfg.seed)
  run = {'ema': None, 'tokens_seen': 0.0, 'train_time': 0.0, 'last_eval': None}
  if resume is not None:
    state, meta = resume_state(ckpt, resume, cfg, accum, tx, params, on_config_change, log,
                               mesh)
    rows.set_state(meta['data'])
    run = meta['run']
  else:
    state = init_train_state(params, tx, cfg.seed, accum)
  state = parallel.replicate(state, mesh)
  faults = parse_faults(cfg.inject_faults, accum.num_microbatches)
  # One device: the plain one-device program (no shard_map around a single device).
  train_step = jax.jit(make_train_step(loss_fn, tx, accum, mesh=mesh if mesh.size > 1 else None),
                       donate_argnums=0, static_argnames='last_call')
  call_rows = accum.per_call * accum.microbatch_size * mesh.size
  my_rows = parallel.process_rows(call_rows)

  def next_batch(update, calls_done):
    batch = rows.next_rows(call_rows, part=my_rows)
    if faults:
      # Injected on the first device's rows (device-major layout): one bad micro-batch.
      fault = np.ones(call_rows, np.float32)
      fault[:accum.per_call * accum.microbatch_size] = fault_rows(
          faults, update, calls_done * accum.per_call, accum.per_call, accum.microbatch_size)
      batch['fault'] = fault[my_rows[0]:my_rows[1]]
    return parallel.shard_batch(batch, mesh)

  compute_dtype = accum.compute_jnp_dtype

  @jax.jit
  def eval_sums(params, batch):
    logits = apply(cast_floats(params, compute_dtype), batch['inputs'])
    return token_cross_entropy(logits, batch['targets'], batch['mask'])

  # Eval is small: its batches are replicated and every device evaluates them whole.
  eval_set = parallel.replicate(
      data_lib.eval_batches(eval_split, cfg.batch_size, cfg.eval_batches), mesh)

  def evaluate(params):
    sums = [jax.device_get(eval_sums(params, b)) for b in eval_set]
    return sum(float(s) for s, _ in sums) / sum(float(w) for _, w in sums)

  update = int(state.update_step)
  calls_done = int(state.cycle_microbatch) // accum.per_call
  microbatches = int(state.microbatch_step)
  out.mkdir(parents=True, exist_ok=True)
  setup = describe(accum)
  info = {
      'memory_plan': dataclasses.asdict(plan) if plan else None,
      'devices': [str(d) for d in mesh.devices.flat], 'processes': jax.process_count(),
      'num_params': num_params(params),
      'data': cfg.data or f'python stdlib sources ({data_lib.default_corpus_files()[0].parent})',
      'train_files': train_split.num_files, 'train_bytes': train_split.num_bytes,
      'train_rows': int(len(train_split.lengths)), 'eval_files': eval_split.num_files,
      'eval_rows_used': len(eval_set) * cfg.batch_size, 'resumed_at_update': update,
  }
  metrics_path = out / 'metrics.jsonl'
  records = []
  if main_process:
    (out / 'config.json').write_text(json.dumps(
        {'train': dataclasses.asdict(cfg), 'accumulation': setup, 'run': info}, indent=2))
    records = trim_metrics(metrics_path, update) if resume is not None else []
    if resume is None:
      metrics_path.unlink(missing_ok=True)
  writer = logs.MetricsWriter(metrics_path if main_process else None)

  log.table('accumjax train', [
      ('device(s)', ', '.join(info['devices'])),
      *([('data parallel', f'mesh data={mesh.size} ({jax.process_count()} process(es) x '
                           f'{mesh.size // jax.process_count()} device(s)); {accum.dp_reduction} '
                           f'of the sums once per call, {accum.calls_per_update} per update')]
        if mesh.size > 1 else []),
      ('model', f'{info["num_params"]:,} params, d_model {cfg.d_model}, {cfg.num_layers} layers, '
                f'{cfg.num_heads} heads, {cfg.positions} positions, dropout {cfg.dropout}'),
      ('data', f'{info["data"]}: {train_split.num_files} train files '
               f'({train_split.num_bytes / 1e6:.1f} MB, {len(train_split.lengths):,} rows), '
               f'{eval_split.num_files} eval files'),
      ('micro-batch', f'{accum.microbatch_size} x {cfg.seq_len} tokens'),
      ('K (micro-batches/update)', accum.num_microbatches),
      ('effective batch', f'{accum.microbatch_size} x {accum.num_microbatches} x '
                          f'{accum.num_devices} device(s) = {accum.effective_batch} sequences'),
      ('tokens per update', f'{setup["tokens_per_update"]:,} (incl. padding)'),
      ('mode', f'{accum.mode} ({accum.per_call} micro-batch(es) per call, '
               f'{accum.calls_per_update} call(s) per update)'),
      ('precision', f'{cfg.precision} compute, float32 params/accumulation, loss scaling '
                    f'{setup["loss_scaling"]}'),
      ('non-finite', f'{accum.nonfinite}, stop after {cfg.max_consecutive_skips or "no"} '
                     'skipped updates in a row' + (f'; injecting {cfg.inject_faults}'
                                                    if faults else '')),
      ('optimizer', f'{cfg.optimizer}, lr {cfg.lr:g}, clip {setup["clipping"]}'),
      ('schedule', f'{cfg.schedule}, {cfg.warmup_steps} warmup updates, {cfg.steps} updates'),
      ('checkpoints', f'every {cfg.save_every} updates' + (
          f' and every {cfg.save_every_micro} calls' if cfg.save_every_micro else '')
          + f', keep {cfg.keep}' if saving else 'off'),
      *([('memory plan', f'budget {format_bytes(plan.budget_bytes)}: micro-batch '
                          f'{plan.microbatch_size} x K {plan.num_microbatches}, compiled step '
                          f'{format_bytes(plan.predicted_bytes)} (tried: ' + ', '.join(
                              f'{b}: {format_bytes(n)}' for b, n in plan.tried) + ')')]
        if plan else []),
      ('out', str(out)),
  ])

  last_saved = [None]

  def save():
    nonlocal ckpt
    if ckpt is None:
      ckpt = Checkpointer(out / 'checkpoints', keep=cfg.keep)
    if last_saved[0] != microbatches:  # e.g. a preemption right after a periodic save
      meta = {'config': dataclasses.asdict(cfg), 'data': rows.state(), 'run': run,
              'update': update, 'num_devices': mesh.size}
      last_saved[0] = ckpt.save(state, meta)
    return ckpt.path(last_saved[0])

  def preempted():
    path = save()
    ckpt.wait()
    writer.close()
    log.close()
    log.info(f'preempted: checkpoint written to {path} (update {update}, '
             f'{calls_done * accum.per_call}/{accum.num_microbatches} micro-batches into the '
             f'next); continue with --resume')
    return {'kind': 'preempted', 'update': update, 'checkpoint': str(path), 'preempted': True}

  def check_nonfinite(record, consecutive):
    update, j, n = record['update'], record['first_nonfinite'], record['nonfinite']
    newest = ckpt.steps()[-1] if ckpt is not None and ckpt.steps() else None
    after = (f'; the newest checkpoint is step {newest} in {ckpt.directory}'
             if newest is not None else '')
    if n and accum.nonfinite == 'raise':
      raise NonFiniteError(
          f'non-finite loss or gradient in micro-batch {j} (counting from 0, of '
          f'{accum.num_microbatches}) of update {update}; {n} micro-batch(es) of it non-finite. '
          f'--nonfinite-policy raise stops here: update {update} was not applied, params and '
          f'optimizer state are those after update {update - 1}{after}.')
    if cfg.max_consecutive_skips and consecutive >= cfg.max_consecutive_skips:
      raise NonFiniteError(
          f'{consecutive} updates in a row skipped for non-finite values (updates '
          f'{update - consecutive + 1}-{update}, --max-consecutive-skips '
          f'{cfg.max_consecutive_skips}); the last one had {n} non-finite micro-batch(es), the '
          f'first at micro-batch {j}. Params are those after update {update - consecutive}, '
          f'never poisoned{after}.')

  def _loop():
    nonlocal state, update, calls_done, microbatches
    window_tokens, window_start = 0.0, time.perf_counter()
    log.start_progress(cfg.steps, initial=update)
    while update < cfg.steps:
      t0 = time.perf_counter()
      while calls_done < accum.calls_per_update:
        state, m = train_step(state, next_batch(update + 1, calls_done),
                              last_call=calls_done + 1 == accum.calls_per_update)
        calls_done += 1
        microbatches += accum.per_call
        if cfg.log_microbatches:
          log.info(f'update [{update + 1}/{cfg.steps}] accum {calls_done * accum.per_call}/'
                   f'{accum.num_microbatches} call loss {float(m["call_loss"]):.4f} '
                   f'tokens {float(m["call_weight"]):.0f} cycle loss {float(m["loss"]):.4f}')
        if calls_done < accum.calls_per_update:  # mid-cycle
          if cfg.save_every_micro and (microbatches // accum.per_call) % \
              cfg.save_every_micro == 0:
            save()
          if should_stop():
            return preempted()
      calls_done = 0
      update += 1
      m = jax.device_get(m)
      run['train_time'] += time.perf_counter() - t0
      # The loss of the finite micro-batches (the others were left out of every sum).
      loss, weight = float(m['loss']), float(m['weight'])
      skipped = bool(m['skipped'])
      if not weight:
        loss = math.nan  # no micro-batch was left to measure (a zero-weight or all-bad update)
      if not skipped:  # a skipped update trained on nothing: not in the ema, not seen
        run['ema'] = loss if run['ema'] is None else 0.9 * run['ema'] + 0.1 * loss
        run['tokens_seen'] += weight
      window_tokens += weight
      ema = math.nan if run['ema'] is None else run['ema']
      # The schedule counts applied updates only (a skipped update leaves the count as is).
      applied = update - 1 - int(m['skipped_updates']) + int(skipped and int(m['nonfinite']) > 0)
      record = {'kind': 'train', 'update': update, 'loss': loss, 'ema': ema,
                'lr': float(schedule(applied)), 'grad_norm': float(m['grad_norm']),
                'tokens': run['tokens_seen'], 'update_tokens': weight, 'skipped': skipped,
                'nonfinite': int(m['nonfinite']), 'first_nonfinite': int(m['first_nonfinite']),
                'skipped_updates': int(m['skipped_updates']),
                'nonfinite_microbatches': int(m['nonfinite_microbatches']),
                'loss_scale': float(m['loss_scale']), 'time': time.perf_counter() - start}
      records.append(record)
      writer.write(record)
      check_nonfinite(record, int(m['consecutive_skips']))
      log.advance()
      if update % cfg.log_every == 0 or update == cfg.steps:
        now = time.perf_counter()
        tok_s = window_tokens / (now - window_start)
        window_tokens, window_start = 0.0, now
        log.info(logs.update_line(update, cfg.steps, loss, ema, record['lr'],
                                  accum.num_microbatches, accum.num_microbatches, tok_s,
                                  record['grad_norm'], record['skipped_updates'],
                                  record['nonfinite_microbatches'],
                                  record['loss_scale'] if accum.loss_scaling else None))
      if update % cfg.eval_every == 0 or update == cfg.steps:
        eval_loss = evaluate(state.params)
        run['last_eval'] = {'kind': 'eval', 'update': update, 'loss': eval_loss,
                            'perplexity': math.exp(eval_loss), 'tokens': run['tokens_seen']}
        records.append(run['last_eval'])
        writer.write(run['last_eval'])
        log.info(f'eval   [{update}/{cfg.steps}] loss {eval_loss:.4f} '
                 f'ppl {math.exp(eval_loss):.2f}')
        window_start = time.perf_counter()  # eval time is not training throughput
      saved_now = bool(saving and (
          (cfg.save_every and update % cfg.save_every == 0) or update == cfg.steps))
      if saved_now:
        save()
      if should_stop() and update < cfg.steps:
        return preempted()
  start = time.perf_counter()
  try:
    stopped = _loop()
    if ckpt:
      ckpt.wait()  # surfaces a failed background save as an error here
  except NonFiniteError:
    writer.close()
    log.close()
    raise
  finally:
    if ckpt:
      ckpt.close()
  if stopped is not None:
    return stopped
  log.close()
  ema = math.nan if run['ema'] is None else run['ema']
  if run['last_eval'] is None or run['last_eval']['update'] != update:
    eval_loss = evaluate(state.params)
    run['last_eval'] = {'kind': 'eval', 'update': update, 'loss': eval_loss,
                        'perplexity': math.exp(eval_loss), 'tokens': run['tokens_seen']}
  wall = time.perf_counter() - start
  fp = logs.fingerprint(state.params)
  train_records = [r for r in records if r['kind'] == 'train']
  summary = {
      'kind': 'summary', 'updates': update,
      'final_train_loss': train_records[-1]['loss'] if train_records else float('nan'),
      'final_train_ema': run['ema'], 'final_eval_loss': run['last_eval']['loss'],
      'final_eval_perplexity': run['last_eval']['perplexity'],
      'tokens_seen': run['tokens_seen'], 'wall_time_s': wall,
      'train_tokens_per_s': run['tokens_seen'] / max(run['train_time'], 1e-9),
      'first_train_loss': train_records[0]['loss'] if train_records else float('nan'),
      'params_fingerprint': fp, 'preempted': False,
      'skipped_updates': int(state.skipped_updates),
      'nonfinite_microbatches': int(state.nonfinite_microbatches),
      'loss_scale': float(state.loss_scale),
  }
  writer.write(summary)
  writer.close()
  if main_process:
    logs.plot_losses(records, out / 'loss.png',
                     title=f'{accum.mode}, K={accum.num_microbatches}, '
                           f'{setup["tokens_per_update"]:,} tokens/update, {cfg.precision}')
  log.table('summary', [
      ('updates', update),
      ('train loss (first -> last)', f'{summary["first_train_loss"]:.4f} -> '
                                     f'{summary["final_train_loss"]:.4f} '
                                     f'(ema {ema:.4f})'),
      ('eval loss / perplexity', f'{summary["final_eval_loss"]:.4f} / '
                                 f'{summary["final_eval_perplexity"]:.2f}'),
      ('tokens seen (real, unpadded)', f'{run["tokens_seen"]:,.0f}'),
      ('wall time' + (' (this process)' if resume is not None else ''), f'{wall:.1f} s'),
      ('train tokens/s', f'{summary["train_tokens_per_s"]:,.0f}'),
      ('skipped updates / non-finite micro-batches',
       f'{summary["skipped_updates"]} / {summary["nonfinite_microbatches"]}'),
      ('params fingerprint', fp),
      ('outputs', f'{out / "metrics.jsonl"}, {out / "config.json"}, {out / "loss.png"}'),
  ])
  return summary
