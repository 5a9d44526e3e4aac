"""What a run writes and says: config.json, metrics.jsonl, the banner, the log lines, the plots,
the summary; and the stop for non-finite values (`NonFiniteError`).

Each update's record is made from its metrics once they are read from the device (the loop
reads them after it has dispatched the next update). Not here: the loop (train.py).
"""

import json
import math
import time

import jax

from accumjax import parallel
from accumjax.checkpoint import fingerprint, json_safe
from accumjax.config import AccumConfig
from accumjax.lm import config as config_lib
from accumjax.lm import logs
from accumjax.lm.resume import trim_metrics
from accumjax.lm.run import NOISE_EMA, Run, evaluate
from accumjax.noise import SmoothedNoiseScale
from accumjax.planner import describe_plan, format_bytes
from accumjax.state import describe


class NonFiniteError(FloatingPointError):
  """The run stopped for non-finite values ('raise' policy, or too many skips in a row)."""


STATE_PARTS = {'params': 'params', 'opt_state': 'optimizer state',
               'accumulator': 'accumulator between calls',
               'call_accumulator': 'accumulator within a call'}


LIVE_PARTS = {'gathered_params': 'gathered params', 'microbatch_gradient': 'micro-batch gradient',
              'activations': 'activations', 'layer_working': 'one layer working'}


def _gather_words(accum) -> str:
  if accum.fsdp_gather == 'layer':
    return ('params gathered one layer at a time (forward and backward), each layer\'s gradient '
            'reduce-scattered as it is produced')
  return 'params all-gathered once per call, gradients reduce-scattered ' + (
      'once per call' if accum.fsdp_reduce == 'call' else 'after every micro-batch')


def _live_words(live: dict) -> str:
  state = sum(live[k] for k in ('params', 'opt_state', 'accumulator', 'call_accumulator',
                                 'update'))
  return f'~{format_bytes(live["total"])} (state and sums {format_bytes(state)}, ' + ', '.join(
      f'{words} {format_bytes(live[k])}' for k, words in LIVE_PARTS.items()) + ')'


def banner(run: Run) -> list[tuple[str, object]]:
  """The rows of the start-up table."""
  cfg, accum, info, mesh, plan = run.cfg, run.accum, run.info, run.mesh, run.plan
  setup, m = describe(accum), cfg.model
  fsdp = parallel.fsdp_size(mesh)
  return [
      ('device(s)', ', '.join(info['devices'])),
      *([('data parallel', f'mesh data={mesh.size} ({jax.process_count()} process(es) x '
                           f'{mesh.size // jax.process_count()} device(s)); {accum.dp_reduction} '
                           f'of the sums once per call, {accum.calls_per_update} per update')]
        if mesh.size > 1 and fsdp == 1 else []),
      *([('sharded (fsdp)', f'mesh data={mesh.shape["data"]},fsdp={fsdp} '
                            f'({jax.process_count()} process(es) x '
                            f'{mesh.size // jax.process_count()} device(s)); params, optimizer '
                            f'state and accumulator split over fsdp; ' + _gather_words(accum))]
        if fsdp > 1 else []),
      ('state per device', ', '.join(
          f'{STATE_PARTS[name]} {format_bytes(n)}' + (
              ' (host memory)' if name == 'accumulator' and accum.accumulator_memory == 'host'
              else '') for name, n in info['state_bytes_per_device'].items())),
      ('live set per device', _live_words(info['live_bytes_per_device'])),
      ('model', f'{info["num_params"]:,} params, d_model {m.d_model}, {m.num_layers} layers, '
                f'{m.num_heads} heads, {m.positions} positions, dropout {m.dropout}, '
                f'remat {m.remat}'),
      ('data', f'{info["data"]}: {info["train_files"]} train files '
               f'({info["train_bytes"] / 1e6:.1f} MB, {info["train_rows"]:,} rows), '
               f'{info["eval_files"]} eval files'),
      ('micro-batch', f'{accum.microbatch_size} x {cfg.accum.seq_len} tokens'),
      ('K (micro-batches/update)', run.k_plan.describe() + (
          f'; lr x (K / {accum.base_k}) ** {accum.lr_power:g}' if accum.lr_power else '')
          if run.k_plan else accum.num_microbatches),
      ('effective batch', f'{accum.microbatch_size} x {accum.num_microbatches} x '
                          f'{accum.num_devices} device(s) = {accum.effective_batch} sequences'),
      ('tokens per update', f'{setup["tokens_per_update"]:,} (incl. padding)'),
      ('mode', f'{accum.mode} ({accum.per_call} micro-batch(es) per call, '
               f'{accum.calls_per_update} call(s) per update)'),
      ('precision', f'{config_lib.to_flat(cfg)["precision"]} compute, float32 '
                    f'params/accumulation, loss scaling {setup["loss_scaling"]}'),
      ('non-finite', f'{accum.nonfinite}, stop after {cfg.max_consecutive_skips or "no"} '
                     'skipped updates in a row' + (f'; injecting {cfg.inject_faults}'
                                                    if run.faults else '')),
      ('optimizer', f'{cfg.optimizer}, lr {cfg.lr:g}, clip {setup["clipping"]}'),
      ('schedule', f'{cfg.schedule}, {cfg.warmup_steps} warmup updates, {cfg.steps} updates'),
      ('noise statistics', 'B_simple per update from the micro-batches (ema of numerator and '
                           f'denominator, {NOISE_EMA})' if accum.noise_stats else
                           'off' + (' (one micro-batch per update)' if cfg.noise_stats else '')),
      ('checkpoints', f'every {cfg.save_every} updates' + (
          f' and every {cfg.save_every_micro} calls' if cfg.save_every_micro else '')
          + f', keep {cfg.keep}' if run.saving else 'off'),
      *([('memory plan', describe_plan(plan))] if plan else []),
      ('out', str(run.out)),
  ]


def open_outputs(run: Run, resumed: bool):
  """config.json, metrics.jsonl (trimmed to the checkpoint on resume) and the banner."""
  prog = run.progress
  run.out.mkdir(parents=True, exist_ok=True)
  path = run.out / 'metrics.jsonl'
  if run.main_process:
    (run.out / 'config.json').write_text(json.dumps(json_safe(
        {'train': config_lib.to_flat(run.cfg), 'accumulation': describe(run.accum, prog.state),
         'run': run.info}), indent=2, allow_nan=False))
    prog.records = trim_metrics(path, prog.update) if resumed else []
    if not resumed:
      path.unlink(missing_ok=True)
  prog.writer = logs.MetricsWriter(path if run.main_process else None)
  run.log.table('accumjax train', banner(run))


def _check_nonfinite(run: Run, record: dict, consecutive: int):
  prog = run.progress
  cfg, accum = run.cfg, run.accum
  update, j, n = record['update'], record['first_nonfinite'], record['nonfinite']
  newest = prog.ckpt.steps()[-1] if prog.ckpt is not None and prog.ckpt.steps() else None
  after = (f'; the newest checkpoint is step {newest} in {prog.ckpt.directory}'
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
        f'{cfg.max_consecutive_skips}); the last one had {n} non-finite micro-batch(es), '
        + (f'the first at micro-batch {j}' if j >= 0 else 'in its gradients (which micro-batch '
           'is not tracked under skip_update; --nonfinite-policy raise names it)')
        + f'. Params are those after update {update - consecutive}, never poisoned{after}.')


def record_update(run: Run, m: dict) -> dict:
  """The update's metrics.jsonl record (written), the EMA and token counts, the log line.
  `m`: the update's metrics read to the host, with its number `update` and its `k`."""
  prog = run.progress
  cfg, stats, update = run.cfg, prog.stats, m['update']
  # The loss of the finite micro-batches (the others were left out of every sum).
  loss, weight, skipped = float(m['loss']), float(m['weight']), bool(m['skipped'])
  if not weight:
    loss = math.nan  # no micro-batch was left to measure (a zero-weight or all-bad update)
  if not skipped:  # a skipped update trained on nothing: not in the ema, not seen
    stats.ema = loss if stats.ema is None else 0.9 * stats.ema + 0.1 * loss
    stats.tokens_seen += weight
  prog.window[0] += weight
  ema = math.nan if stats.ema is None else stats.ema
  noise = _record_noise(run, m, skipped)
  record = {'kind': 'train', 'update': update, 'loss': loss, 'ema': ema,
            'lr': float(run.schedule(int(m['schedule_count']))) * _lr_scale(run.accum, m['k']),
            'grad_norm': float(m['grad_norm']), 'tokens': stats.tokens_seen,
            'update_tokens': weight, 'skipped': skipped, 'nonfinite': int(m['nonfinite']),
            'first_nonfinite': int(m['first_nonfinite']),
            'skipped_updates': int(m['skipped_updates']),
            'nonfinite_microbatches': int(m['nonfinite_microbatches']),
            'loss_scale': float(m['loss_scale']), 'k': int(m['k']),
            **noise, 'time': time.perf_counter() - prog.start}
  prog.records.append(record)
  prog.writer.write(record)
  _check_nonfinite(run, record, int(m['consecutive_skips']))
  run.log.advance()
  if update % cfg.log_every == 0 or update == cfg.steps:
    now = time.perf_counter()
    tok_s = prog.window[0] / (now - prog.window[1])
    prog.window[:] = [0.0, now]
    k = record['k']
    run.log.info(logs.update_line(
        update, cfg.steps, loss, ema, record['lr'], k, k, tok_s, record['grad_norm'],
        record['skipped_updates'], record['nonfinite_microbatches'],
        record['loss_scale'] if run.accum.loss_scaling else None,
        noise.get('b_simple_ema')))
  return record


def _lr_scale(accum: AccumConfig, k: int) -> float:
  """The learning-rate multiplier of an update of K micro-batches (--lr-batch-scaling)."""
  return (k / accum.base_k) ** accum.lr_power if accum.lr_power else 1.0


def _record_noise(run: Run, m: dict, skipped: bool) -> dict:
  """This update's noise statistics and the smoothed B_simple (in real tokens), for the
  record; {} without --noise-stats."""
  if not run.accum.noise_stats:
    return {}
  stats = run.progress.stats
  values = {k: float(m[k]) for k in ('g_sq', 'trace_sigma', 'b_simple')}
  smoother = SmoothedNoiseScale(NOISE_EMA, stats.noise_ema)
  smoothed = smoother.update(values, skipped)
  stats.noise_ema = smoother.state
  return values | {'b_simple_ema': smoothed}


def finish(run: Run, resumed: bool) -> dict:
  """The final eval (if not just done), summary record, loss plot and summary table."""
  prog = run.progress
  run.log.close()
  stats, state = prog.stats, prog.state
  ema = math.nan if stats.ema is None else stats.ema
  if stats.last_eval is None or stats.last_eval['update'] != prog.update:
    evaluate(run)
  wall = time.perf_counter() - prog.start
  fp = fingerprint(state.params)
  train = [r for r in prog.records if r['kind'] == 'train']
  summary = {
      'kind': 'summary', 'updates': prog.update,
      'final_train_loss': train[-1]['loss'] if train else float('nan'),
      'final_train_ema': stats.ema, 'final_eval_loss': stats.last_eval['loss'],
      'final_eval_perplexity': stats.last_eval['perplexity'],
      'tokens_seen': stats.tokens_seen, 'wall_time_s': wall,
      'train_tokens_per_s': stats.tokens_seen / max(stats.train_time, 1e-9),
      'first_train_loss': train[0]['loss'] if train else float('nan'),
      'params_fingerprint': fp, 'preempted': False,
      'skipped_updates': int(state.skipped_updates),
      'nonfinite_microbatches': int(state.nonfinite_microbatches),
      'loss_scale': float(state.loss_scale),
      'b_simple_ema': train[-1].get('b_simple_ema', math.nan) if train else math.nan,
  }
  prog.writer.write(summary)
  prog.writer.close()
  if run.main_process:
    logs.plot_losses(prog.records, run.out / 'loss.png',
                     title=f'{run.accum.mode}, K={run.accum.num_microbatches}, '
                           f'{describe(run.accum)["tokens_per_update"]:,} tokens/update, '
                           f'{config_lib.to_flat(run.cfg)["precision"]}')
    if run.accum.noise_stats:
      logs.plot_noise(prog.records, run.out / 'noise_scale.png')
  run.log.table('summary', [
      ('updates', prog.update),
      ('train loss (first -> last)', f'{summary["first_train_loss"]:.4f} -> '
                                     f'{summary["final_train_loss"]:.4f} (ema {ema:.4f})'),
      ('eval loss / perplexity', f'{summary["final_eval_loss"]:.4f} / '
                                 f'{summary["final_eval_perplexity"]:.2f}'),
      ('tokens seen (real, unpadded)', f'{stats.tokens_seen:,.0f}'),
      ('wall time' + (' (this process)' if resumed else ''), f'{wall:.1f} s'),
      ('train tokens/s', f'{summary["train_tokens_per_s"]:,.0f}'),
      ('skipped updates / non-finite micro-batches',
       f'{summary["skipped_updates"]} / {summary["nonfinite_microbatches"]}'),
      *([('gradient noise scale', f'B_simple {summary["b_simple_ema"]:,.0f} tokens (smoothed) '
                                  f'vs {train[-1]["update_tokens"]:,.0f} real tokens per update')]
        if run.accum.noise_stats and train else []),
      ('params fingerprint', fp),
      ('outputs', f'{run.out / "metrics.jsonl"}, {run.out / "config.json"}, '
                  f'{run.out / "loss.png"}'
                  + (f', {run.out / "noise_scale.png"}' if run.accum.noise_stats else '')),
  ])
  return summary
