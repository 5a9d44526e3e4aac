"""Training a byte-level language model with accumulation: `train_and_evaluate(cfg, out_dir)`.

The library side of `python -m experiments.train`: `run.build_run` makes the run from a
`TrainConfig`; the loop here runs one optimizer update at a time through the library's call
driver (`accumjax.loop.run_update`), with mid-cycle saves and preemption hooked in after each
call, and dispatches update u+1 before it reads update u's metrics (reading them waits for the
device; doing it while the next update runs keeps the device busy). Where something must see
the state of update u (an eval, a save, auto K, the last update), it waits. report.py writes
and logs; `config.json`, `metrics.jsonl`, `loss.png` and checkpoints go to `out_dir`. No flag
parsing here.

Non-finite values never reach the params (see accumjax/optim.py); the loop only reads the
counters: under --nonfinite-policy raise it stops at the first update with a non-finite
micro-batch, and under any policy after --max-consecutive-skips skipped updates in a row, with a
`NonFiniteError` naming the update and micro-batch. It does not save at that point: the state is
unpoisoned but the newest checkpoint is the one to resume from.
"""

import dataclasses
import itertools
import math
import pathlib
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from accumjax import loop, parallel, schedules
from accumjax import state as state_lib
from accumjax.checkpoint import Checkpointer
from accumjax.lm import config as config_lib
from accumjax.lm import faults as faults_lib
from accumjax.lm import logs
from accumjax.lm.config import TrainConfig
from accumjax.lm.guards import check_host_memory, check_out_dir
from accumjax.lm.report import NonFiniteError, finish, open_outputs, record_update
from accumjax.lm.resume import STATE_LAYOUT
from accumjax.lm.run import NOISE_EMA, Run, build_run, evaluate, update_k

__all__ = ['NOISE_EMA', 'NonFiniteError', 'check_host_memory', 'train_and_evaluate']

def call_batches(run: Run, first_call: int, k: int):
  """The calls of the next update (K = k) from its call `first_call` on (sharded
  batches), with the fault drill's factors on the first device's rows (device-major layout)."""
  prog = run.progress
  accum = run.accum
  per_call = k if accum.mode == 'scan' else accum.per_call
  call_rows = per_call * accum.microbatch_size * run.mesh.size
  my_rows = parallel.process_rows(call_rows)
  for calls_done in itertools.count(first_call):
    batch = run.rows.next_rows(call_rows, part=my_rows)
    if run.faults:
      fault = np.ones(call_rows, np.float32)
      fault[:per_call * accum.microbatch_size] = faults_lib.rows(
          run.faults, prog.update + 1, calls_done * per_call, per_call,
          accum.microbatch_size)
      batch['fault'] = fault[my_rows[0]:my_rows[1]]
    yield parallel.shard_batch(batch, run.mesh)


def save(run: Run) -> pathlib.Path:
  """Starts an asynchronous checkpoint of the run where it is (once per position)."""
  prog = run.progress
  if prog.ckpt is None:
    prog.ckpt = Checkpointer(run.out / 'checkpoints', keep=run.cfg.keep)
  _read_pending(run)  # the saved statistics count every update done (a mid-cycle save)
  if prog.last_saved != prog.microbatches:  # e.g. a preemption right after a periodic save
    meta = {'config': config_lib.to_flat(run.cfg), 'data': run.rows.state(),
            'run': dataclasses.asdict(prog.stats), 'update': prog.update,
            'num_devices': run.mesh.size, 'data_fingerprint': run.info['train_fingerprint'],
            'state_layout': STATE_LAYOUT}
    prog.last_saved = prog.ckpt.save(prog.state, meta)
  return prog.ckpt.path(prog.last_saved)


def _after_call(run: Run, should_stop, k: int):
  """The call driver's hook: the per-call log line, mid-cycle saves, and preemption polls."""
  prog = run.progress
  cfg, accum = run.cfg, run.accum
  per_call = k if accum.mode == 'scan' else accum.per_call

  def after_call(state, m, position):
    prog.state = state
    prog.microbatches += per_call
    if cfg.log_microbatches:
      run.log.info(f'update [{prog.update + 1}/{cfg.steps}] accum {position * per_call}/'
                   f'{k} call loss {float(m["call_loss"]):.4f} '
                   f'tokens {float(m["call_weight"]):.0f} cycle loss {float(m["loss"]):.4f}')
    if position == k // per_call:
      return False  # the update is complete: the caller saves and polls
    if cfg.save_every_micro and (prog.microbatches // accum.per_call) % cfg.save_every_micro == 0:
      save(run)
    return should_stop()

  return after_call


def train_update(run: Run, should_stop) -> dict | None:
  """Dispatches one optimizer update; its metrics (device arrays, not read yet, with the
  update's number and K), or None if preempted mid-cycle. Reads nothing from the device: the
  cycle's position is counted here (read from the state once, when the run was built)."""
  prog = run.progress
  first_call, prog.position = prog.position, 0
  k = update_k(run)
  done = loop.run_update(run.step, prog.state, call_batches(run, first_call, k), run.accum,
                         num_microbatches=k, after_call=_after_call(run, should_stop, k),
                         position=first_call)
  prog.state = done.state
  if done.stopped:
    prog.position = first_call + done.calls
    return None
  prog.update += 1
  return dict(done.metrics, k=k, update=prog.update)


def _read(run: Run, m: dict):
  """Reads a dispatched update's metrics (waiting for the device), records and logs them."""
  prog = run.progress
  record = record_update(run, jax.device_get(m))
  now = time.perf_counter()
  prog.stats.train_time += now - prog.mark
  prog.mark = now
  if run.k_plan is not None and run.k_plan.auto:
    _next_auto_k(run, record)


def _waits(run: Run) -> bool:
  """Whether the update just dispatched must be read before the next one is dispatched:
  something reads its state (an eval, a save, the end) or its metrics decide the next (auto K)."""
  cfg, update = run.cfg, run.progress.update
  return (update == cfg.steps or update % cfg.eval_every == 0
          or (run.saving and cfg.save_every and update % cfg.save_every == 0)
          or (run.k_plan is not None and run.k_plan.auto))


def _next_auto_k(run: Run, record: dict):
  """--grad-accum-steps auto: K of the next update, from the smoothed B_simple (the update
  just recorded is the newest: auto K never dispatches ahead)."""
  prog = run.progress
  stats, plan = prog.stats, run.k_plan
  if prog.update - stats.k_since < config_lib.AUTO_MIN_DWELL or not record['update_tokens']:
    return
  per_microbatch = record['update_tokens'] / record['k']
  k = schedules.auto_k(record.get('b_simple_ema', math.nan), per_microbatch, stats.k,
                       plan.allowed)
  if k != stats.k:
    run.log.info(f'auto K: {stats.k} -> {k} from update {prog.update + 1} on (B_simple '
                 f'{record["b_simple_ema"]:,.0f} tokens, {per_microbatch:,.0f} per micro-batch)')
    stats.k, stats.k_since = k, prog.update


def _after_update(run: Run):
  """Periodic eval and checkpoint after an update."""
  prog = run.progress
  cfg, update = run.cfg, prog.update
  if update % cfg.eval_every == 0 or update == cfg.steps:
    record = evaluate(run)
    prog.records.append(record)
    prog.writer.write(record)
    run.log.info(f'eval   [{update}/{cfg.steps}] loss {record["loss"]:.4f} '
                 f'ppl {record["perplexity"]:.2f}')
    prog.window[1] = prog.mark = time.perf_counter()  # eval time is not training time
  if run.saving and ((cfg.save_every and update % cfg.save_every == 0) or update == cfg.steps):
    save(run)


def preempted(run: Run) -> dict:
  """Checkpoints where the run is (mid-cycle included) and says how to continue."""
  prog = run.progress
  path = save(run)
  prog.ckpt.wait()
  prog.writer.close()
  run.log.close()
  calls = state_lib.cycle_microbatches(prog.state)
  run.log.info(f'preempted: checkpoint written to {path} (update {prog.update}, '
               f'{calls}/{run.accum.num_microbatches} micro-batches into the '
               f'next); continue with --resume')
  return {'kind': 'preempted', 'update': prog.update, 'checkpoint': str(path), 'preempted': True}


def _read_pending(run: Run):
  """Reads the update whose metrics are still on the device, if one is (see `_train_loop`)."""
  prog = run.progress
  if prog.pending is not None:
    m, prog.pending = prog.pending, None
    _read(run, m)


def _train_loop(run: Run, should_stop) -> dict | None:
  """Updates until `cfg.steps`; the preemption result if stopped early, else None.

  Update u's metrics are read after update u + 1 is dispatched (`prog.pending`), unless
  something must see update u first (`_waits`); a save (mid-cycle too) reads them first."""
  prog = run.progress
  prog.window[:] = [0.0, time.perf_counter()]
  prog.mark = time.perf_counter()
  run.log.start_progress(run.cfg.steps, initial=prog.update)
  while prog.update < run.cfg.steps:
    m = train_update(run, should_stop)
    _read_pending(run)
    if m is None:
      return preempted(run)
    if not _waits(run):
      prog.pending = m
    else:
      _read(run, m)
      _after_update(run)
    if should_stop() and prog.update < run.cfg.steps:
      return preempted(run)  # (its save reads the pending update)
  return None


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
  if jax.process_count() > 1:  # a preemption must stop every process at the same call
    local_stop = should_stop
    should_stop = lambda: bool(multihost_utils.process_allgather(np.array(local_stop())).any())
  check_out_dir(pathlib.Path(out_dir), resume)
  run = build_run(cfg, out_dir, log, resume, on_config_change)
  try:
    return _train_and_finish(run, should_stop, resumed=resume is not None)
  finally:
    if run.lock is not None:
      run.lock.release()


def _train_and_finish(run: Run, should_stop, resumed: bool) -> dict:
  prog = run.progress
  open_outputs(run, resumed=resumed)
  prog.start = time.perf_counter()
  try:
    stopped = _train_loop(run, should_stop)
    if prog.ckpt:
      prog.ckpt.wait()  # surfaces a failed background save as an error here
  except NonFiniteError:
    prog.writer.close()
    run.log.close()
    raise
  finally:
    if prog.ckpt:
      prog.ckpt.close()
  return stopped if stopped is not None else finish(run, resumed=resumed)
