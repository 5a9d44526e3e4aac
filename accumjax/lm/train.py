"""Training a byte-level language model with accumulation: `train_and_evaluate(cfg, out_dir)`.

The library side of `python -m experiments.train`, in a few short steps: `build_run` makes
the data, model, optimizer, train step and state (fresh or resumed) from a `TrainConfig`;
`train_update` runs one optimizer update through the library's call driver
(`accumjax.loop.run_update`), with mid-cycle saves and preemption hooked in after each call;
`record_update`, `evaluate` and `save` log, evaluate and checkpoint; `finish` writes the
summary. `config.json`, `metrics.jsonl`, `loss.png` and checkpoints go to `out_dir`. No flag
parsing here.

Non-finite values never reach the params (see accumjax/optim.py); the loop only reads the
counters: under --nonfinite-policy raise it stops at the first update with a non-finite
micro-batch, and under any policy after --max-consecutive-skips skipped updates in a row, with a
`NonFiniteError` naming the update and micro-batch. It does not save at that point: the state is
unpoisoned but the newest checkpoint is the one to resume from.
"""

import dataclasses
import itertools
import json
import math
import os
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from accumjax import loop, parallel, schedules
from accumjax.checkpoint import Checkpointer, fingerprint
from accumjax.config import AccumConfig, describe
from accumjax.core import ConfigError
from accumjax.lm import config as config_lib
from accumjax.lm import data as data_lib
from accumjax.lm import faults as faults_lib
from accumjax.lm import logs
from accumjax.lm.build import build_optimizer, make_loss_fn, plan_for_budget
from accumjax.lm.config import ON_CONFIG_CHANGE, TrainConfig
from accumjax.lm.model import make_lm, num_params
from accumjax.lm.resume import resume_state, trim_metrics
from accumjax.losses import token_cross_entropy
from accumjax.planner import format_bytes
from accumjax.precision import cast_floats
from accumjax.step import init_train_state, jit_train_step, make_train_step


class NonFiniteError(FloatingPointError):
  """The run stopped for non-finite values ('raise' policy, or too many skips in a row)."""


@dataclasses.dataclass
class RunStats:
  """What a run has measured so far; saved in every checkpoint's metadata (as 'run')."""
  ema: float | None = None
  tokens_seen: float = 0.0
  train_time: float = 0.0
  last_eval: dict | None = None
  noise_ema: list | None = None  # [EMA of trace_sigma, EMA of g_sq] (see NOISE_EMA)
  k: int | None = None  # --grad-accum-steps auto: K of the update in progress or next
  k_since: int = 0  # auto: the update count when K last changed


# B_simple is smoothed as the paper does: numerator and denominator separately (one update's
# g_sq is a difference of noisy terms and can be <= 0), over ~10 updates. Early in training,
# when |G|^2 falls by orders of magnitude within tens of updates, the smoothed value lags: the
# large early terms dominate both sums until they have decayed (the per-update values do not).
NOISE_EMA = 0.9


@dataclasses.dataclass
class Run:
  """A run being trained: its settings, the jitted step, the state and its bookkeeping."""
  cfg: TrainConfig
  accum: AccumConfig
  mesh: object
  out: pathlib.Path
  log: logs.Logger
  step: Callable
  state: object
  rows: data_lib.RowIterator
  faults: dict
  schedule: Callable
  eval_set: list
  eval_sums: Callable
  info: dict
  plan: object = None
  k_plan: object = None  # config.KPlan when K changes between updates
  ckpt: Checkpointer | None = None
  stats: RunStats = dataclasses.field(default_factory=RunStats)
  records: list = dataclasses.field(default_factory=list)
  writer: logs.MetricsWriter | None = None
  update: int = 0
  microbatches: int = 0
  last_saved: int | None = None
  start: float = 0.0
  window: list = dataclasses.field(default_factory=lambda: [0.0, time.perf_counter()])
  lock: object = None

  @property
  def main_process(self) -> bool:
    return jax.process_index() == 0

  @property
  def saving(self) -> bool:
    return bool(self.cfg.save_every or self.cfg.save_every_micro)


def _eval_fn(apply, compute_dtype):
  @jax.jit
  def eval_sums(params, batch):
    logits = apply(cast_floats(params, compute_dtype), batch['inputs'])
    return token_cross_entropy(logits, batch['targets'], batch['mask'])
  return eval_sums


def _initial_state(cfg, accum, tx, params, out, log, mesh, resume, on_config_change,
                   data_fingerprint):
  """(state, checkpointer or None, meta or None): fresh, or restored from out/checkpoints."""
  ckpt = Checkpointer(out / 'checkpoints', keep=cfg.keep) \
      if cfg.save_every or cfg.save_every_micro or resume is not None else None
  if resume is None:
    return init_train_state(params, tx, cfg.seed, accum), ckpt, None
  state, meta = resume_state(ckpt, resume, cfg, accum, tx, params, on_config_change, log, mesh,
                             data_fingerprint=data_fingerprint)
  return state, ckpt, meta


def check_out_dir(out: pathlib.Path, resume) -> None:
  """Refuses an --out that cannot hold this run, before anything is written."""
  if out.exists() and not out.is_dir():
    raise ConfigError(f'--out {str(out)!r} is an existing file, not a directory.')
  ckpt_dir = out / 'checkpoints'
  if resume is None and ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise ConfigError(
        f'--out {str(out)!r} already holds a run with checkpoints; pass --resume to continue '
        'it, or give another --out (or delete that directory to start over).')
  existing = next(p for p in (out, *out.absolute().parents) if p.exists())
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f'--out {str(out)!r}: {str(existing)!r} is not writable.')


class RunLock:
  """OUT/.lock: one run per output directory. A lock whose process is gone (a SIGKILLed run)
  is stale and taken over; a live one makes the second run refuse."""

  def __init__(self, out: pathlib.Path):
    self.path = out / '.lock'

  def acquire(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        owner = self._owner()
        if owner is not None and _alive(owner):
          raise ConfigError(f'--out {str(self.path.parent)!r} is in use by another run '
                            f'(process {owner}, {self.path}); wait for it or use another '
                            '--out.') from None
        self.path.unlink(missing_ok=True)  # stale: its process is gone
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(str(os.getpid()))
      return self
    raise ConfigError(f'could not take the lock {self.path}.')

  def _owner(self) -> int | None:
    try:
      return int(self.path.read_text().strip())
    except (OSError, ValueError):
      return None

  def release(self):
    if self._owner() == os.getpid():
      self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def available_host_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (None where there is none)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def check_host_memory(cfg: TrainConfig, accum: AccumConfig, devices: int,
                      available: int | None = None):
  """Refuses a call whose batch alone cannot fit in the host memory available now (a huge
  --grad-accum-steps in scan mode feeds every micro-batch of an update in one call), saying
  what was asked and what fits, before anything is written."""
  available = available_host_bytes() if available is None else available
  per_microbatch = accum.microbatch_size * devices * data_lib.host_bytes_per_row(cfg.seq_len)
  need = accum.per_call * per_microbatch
  if available is None or need <= available:
    return
  fits = available // per_microbatch
  raise ConfigError(
      f'--grad-accum-steps {accum.num_microbatches} in {accum.mode} mode feeds '
      f'{accum.per_call:,} micro-batches of {accum.microbatch_size} x {devices} device(s) rows '
      f'x {cfg.seq_len} tokens in one call, which needs at least {format_bytes(need)} of host '
      f'memory for the batch alone; {format_bytes(available)} is available. At most '
      f'{fits:,} micro-batches fit in one call: lower --grad-accum-steps, or use --accum-mode '
      'multisteps (one micro-batch per call) or hybrid with a smaller --microbatches-per-call.')


def build_run(cfg: TrainConfig, out, log, resume=None, on_config_change='refuse') -> Run:
  """Everything a run needs, from its settings (and its checkpoint, when resuming)."""
  mesh = parallel.make_mesh(*config_lib.parse_mesh(cfg.mesh))
  plan = None
  if cfg.memory_budget is not None:
    cfg, plan = plan_for_budget(cfg, mesh)
  accum = config_lib.validate(cfg, mesh.size)
  check_host_memory(cfg, accum, mesh.size)
  if on_config_change not in ON_CONFIG_CHANGE:
    raise ConfigError(f'on_config_change={on_config_change!r}; allowed: refuse, flush.')
  out = pathlib.Path(out)
  if resume is not None and not (out / 'checkpoints').is_dir():
    raise ConfigError(f'--resume: no checkpoints/ in {out} to resume from.')
  train_split, eval_split = data_lib.load_splits(cfg.data, cfg.seq_len, cfg.pack)
  apply, params = make_lm(cfg.model, seed=cfg.seed)
  faults = faults_lib.parse(cfg.inject_faults, accum.num_microbatches)
  loss_fn = make_loss_fn(apply)
  if faults:
    loss_fn = faults_lib.with_faults(loss_fn)
  tx, schedule = build_optimizer(cfg, accum)
  # Everything is checked: from here on the run writes (a checkpoint restore may move broken
  # checkpoints aside), so it takes the directory's lock first.
  lock = RunLock(out).acquire() if jax.process_index() == 0 else None
  try:
    state, ckpt, meta = _initial_state(cfg, accum, tx, params, out, log, mesh, resume,
                                       on_config_change, train_split.fingerprint)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  rows = data_lib.RowIterator(train_split, cfg.seed)
  k_plan = config_lib.k_plan(cfg)
  stats = RunStats(k=k_plan.first_k if k_plan is not None and k_plan.auto else None)
  if meta is not None:
    rows.set_state(meta['data'])
    stats = RunStats(**meta['run'])
    _check_k_on_resume(cfg, k_plan, meta, state, stats)
  # One device: the plain one-device program (no shard_map around a single device).
  step = jit_train_step(make_train_step(loss_fn, tx, accum,
                                        mesh=mesh if mesh.size > 1 else None))
  # Eval is small: its batches are replicated and every device evaluates them whole.
  eval_set = parallel.replicate(
      data_lib.eval_batches(eval_split, cfg.microbatch_size, cfg.eval_batches), mesh)
  state = parallel.place_state(state, mesh)
  info = {
      'memory_plan': dataclasses.asdict(plan) if plan else None,
      'devices': [str(d) for d in mesh.devices.flat], 'processes': jax.process_count(),
      'num_params': num_params(params),
      'data': data_lib.describe_corpus(cfg.data),
      'train_files': train_split.num_files, 'train_bytes': train_split.num_bytes,
      'train_rows': int(len(train_split.lengths)), 'eval_files': eval_split.num_files,
      'train_fingerprint': train_split.fingerprint,
      'eval_rows_used': len(eval_set) * cfg.microbatch_size,
      'resumed_at_update': int(state.update_step),
      'mesh': dict(mesh.shape),
      'state_bytes_per_device': parallel.state_bytes_per_device(state, accum),
  }
  return Run(cfg=cfg, accum=accum, mesh=mesh, out=out, log=log, step=step, state=state,
             rows=rows, faults=faults, schedule=schedule, eval_set=eval_set,
             eval_sums=_eval_fn(apply, accum.compute_jnp_dtype), info=info, plan=plan,
             k_plan=k_plan, ckpt=ckpt, stats=stats, update=int(state.update_step),
             microbatches=int(state.microbatch_step), lock=lock)


def update_k(run: Run) -> int:
  """K of the update that runs next (or is in progress)."""
  return _k_for(run.cfg, run.k_plan, run.stats, run.update) if run.k_plan else \
      run.accum.num_microbatches


def _k_for(cfg, k_plan, stats, update) -> int:
  if k_plan is None:
    return cfg.num_microbatches()
  return stats.k if k_plan.auto else k_plan.schedule.at(update)


def _check_k_on_resume(cfg, k_plan, meta, state, stats):
  """A checkpoint in the middle of an update must be finished with the K it started with."""
  if not int(state.cycle_microbatch):
    return
  saved_cfg = config_lib.from_flat({'noise_stats': False, **meta['config']})
  saved_plan = config_lib.k_plan(saved_cfg)
  update = int(meta['update'])
  before = _k_for(saved_cfg, saved_plan, stats, update) if saved_plan else \
      saved_cfg.num_microbatches(meta.get('num_devices', 1))
  now = _k_for(cfg, k_plan, stats, update) if k_plan else None
  if k_plan is not None and now != before:
    raise ConfigError(
        f'the checkpoint is {int(state.cycle_microbatch)} micro-batches into update '
        f'{update + 1}, which started with K={before}; the new K plan gives it K={now}. Resume '
        'with the saved --grad-accum-schedule / --grad-accum-steps, or change them at an update '
        'boundary.')


def _next_auto_k(run: Run, record: dict):
  """--grad-accum-steps auto: K of the next update, from the smoothed B_simple."""
  stats, plan = run.stats, run.k_plan
  if run.update - stats.k_since < config_lib.AUTO_MIN_DWELL or not record['update_tokens']:
    return
  per_microbatch = record['update_tokens'] / record['k']
  k = schedules.auto_k(record.get('b_simple_ema', math.nan), per_microbatch, stats.k,
                       plan.allowed)
  if k != stats.k:
    run.log.info(f'auto K: {stats.k} -> {k} from update {run.update + 1} on (B_simple '
                 f'{record["b_simple_ema"]:,.0f} tokens, {per_microbatch:,.0f} per micro-batch)')
    stats.k, stats.k_since = k, run.update


STATE_PARTS = {'params': 'params', 'opt_state': 'optimizer state',
               'accumulator': 'accumulator between calls',
               'call_accumulator': 'accumulator within a call'}


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
                            f'state and accumulator split over fsdp; params all-gathered once '
                            f'per call, gradients reduce-scattered '
                            + ('once per call' if accum.fsdp_reduce == 'call' else
                               'after every micro-batch'))] if fsdp > 1 else []),
      ('state per device', ', '.join(
          f'{STATE_PARTS[name]} {format_bytes(n)}' + (
              ' (host memory)' if name == 'accumulator' and accum.accumulator_memory == 'host'
              else '') for name, n in info['state_bytes_per_device'].items())),
      ('model', f'{info["num_params"]:,} params, d_model {m.d_model}, {m.num_layers} layers, '
                f'{m.num_heads} heads, {m.positions} positions, dropout {m.dropout}'),
      ('data', f'{info["data"]}: {info["train_files"]} train files '
               f'({info["train_bytes"] / 1e6:.1f} MB, {info["train_rows"]:,} rows), '
               f'{info["eval_files"]} eval files'),
      ('micro-batch', f'{accum.microbatch_size} x {cfg.seq_len} tokens'),
      ('K (micro-batches/update)', run.k_plan.describe() + (
          f'; lr x (K / {accum.base_k}) ** {accum.lr_power:g}' if accum.lr_power else '')
          if run.k_plan else accum.num_microbatches),
      ('effective batch', f'{accum.microbatch_size} x {accum.num_microbatches} x '
                          f'{accum.num_devices} device(s) = {accum.effective_batch} sequences'),
      ('tokens per update', f'{setup["tokens_per_update"]:,} (incl. padding)'),
      ('mode', f'{accum.mode} ({accum.per_call} micro-batch(es) per call, '
               f'{accum.calls_per_update} call(s) per update)'),
      ('precision', f'{cfg.precision} compute, float32 params/accumulation, loss scaling '
                    f'{setup["loss_scaling"]}'),
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
      *([('memory plan', f'budget {format_bytes(plan.budget_bytes)}: micro-batch '
                          f'{plan.microbatch_size} x K {plan.num_microbatches}, compiled step '
                          f'{format_bytes(plan.predicted_bytes)} (tried: ' + ', '.join(
                              f'{b}: {format_bytes(n)}' for b, n in plan.tried) + ')')]
        if plan else []),
      ('out', str(run.out)),
  ]


def open_outputs(run: Run, resumed: bool):
  """config.json, metrics.jsonl (trimmed to the checkpoint on resume) and the banner."""
  run.out.mkdir(parents=True, exist_ok=True)
  path = run.out / 'metrics.jsonl'
  if run.main_process:
    (run.out / 'config.json').write_text(json.dumps(
        {'train': config_lib.to_flat(run.cfg), 'accumulation': describe(run.accum, run.state),
         'run': run.info}, indent=2))
    run.records = trim_metrics(path, run.update) if resumed else []
    if not resumed:
      path.unlink(missing_ok=True)
  run.writer = logs.MetricsWriter(path if run.main_process else None)
  run.log.table('accumjax train', banner(run))


def call_batches(run: Run, first_call: int, k: int):
  """The calls of update `run.update + 1` (K = k) from its call `first_call` on (sharded
  batches), with the fault drill's factors on the first device's rows (device-major layout)."""
  accum = run.accum
  per_call = k if accum.mode == 'scan' else accum.per_call
  call_rows = per_call * accum.microbatch_size * run.mesh.size
  my_rows = parallel.process_rows(call_rows)
  for calls_done in itertools.count(first_call):
    batch = run.rows.next_rows(call_rows, part=my_rows)
    if run.faults:
      fault = np.ones(call_rows, np.float32)
      fault[:per_call * accum.microbatch_size] = faults_lib.rows(
          run.faults, run.update + 1, calls_done * per_call, per_call,
          accum.microbatch_size)
      batch['fault'] = fault[my_rows[0]:my_rows[1]]
    yield parallel.shard_batch(batch, run.mesh)


def save(run: Run) -> pathlib.Path:
  """Starts an asynchronous checkpoint of the run where it is (once per position)."""
  if run.ckpt is None:
    run.ckpt = Checkpointer(run.out / 'checkpoints', keep=run.cfg.keep)
  if run.last_saved != run.microbatches:  # e.g. a preemption right after a periodic save
    meta = {'config': config_lib.to_flat(run.cfg), 'data': run.rows.state(),
            'run': dataclasses.asdict(run.stats), 'update': run.update,
            'num_devices': run.mesh.size, 'data_fingerprint': run.info['train_fingerprint']}
    run.last_saved = run.ckpt.save(run.state, meta)
  return run.ckpt.path(run.last_saved)


def _after_call(run: Run, should_stop, k: int):
  """The call driver's hook: the per-call log line, mid-cycle saves, and preemption polls."""
  cfg, accum = run.cfg, run.accum
  per_call = k if accum.mode == 'scan' else accum.per_call

  def after_call(state, m, position):
    run.state = state
    run.microbatches += per_call
    if cfg.log_microbatches:
      run.log.info(f'update [{run.update + 1}/{cfg.steps}] accum {position * per_call}/'
                   f'{k} call loss {float(m["call_loss"]):.4f} '
                   f'tokens {float(m["call_weight"]):.0f} cycle loss {float(m["loss"]):.4f}')
    if position == k // per_call:
      return False  # the update is complete: the caller saves and polls
    if cfg.save_every_micro and (run.microbatches // accum.per_call) % cfg.save_every_micro == 0:
      save(run)
    return should_stop()

  return after_call


def train_update(run: Run, should_stop) -> dict | None:
  """One optimizer update; its metrics (host values), or None if preempted mid-cycle."""
  t0 = time.perf_counter()
  first_call = loop.calls_done(run.state, run.accum)
  k = update_k(run)
  done = loop.run_update(run.step, run.state, call_batches(run, first_call, k), run.accum,
                         num_microbatches=k, after_call=_after_call(run, should_stop, k),
                         position=first_call)
  run.state = done.state
  if done.stopped:
    return None
  run.update += 1
  m = dict(jax.device_get(done.metrics), k=k)
  run.stats.train_time += time.perf_counter() - t0
  return m


def _check_nonfinite(run: Run, record: dict, consecutive: int):
  cfg, accum = run.cfg, run.accum
  update, j, n = record['update'], record['first_nonfinite'], record['nonfinite']
  newest = run.ckpt.steps()[-1] if run.ckpt is not None and run.ckpt.steps() else None
  after = (f'; the newest checkpoint is step {newest} in {run.ckpt.directory}'
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


def record_update(run: Run, m: dict) -> dict:
  """The update's metrics.jsonl record (written), the EMA and token counts, the log line."""
  cfg, stats = run.cfg, run.stats
  # The loss of the finite micro-batches (the others were left out of every sum).
  loss, weight, skipped = float(m['loss']), float(m['weight']), bool(m['skipped'])
  if not weight:
    loss = math.nan  # no micro-batch was left to measure (a zero-weight or all-bad update)
  if not skipped:  # a skipped update trained on nothing: not in the ema, not seen
    stats.ema = loss if stats.ema is None else 0.9 * stats.ema + 0.1 * loss
    stats.tokens_seen += weight
  run.window[0] += weight
  ema = math.nan if stats.ema is None else stats.ema
  noise = _record_noise(run, m, skipped)
  record = {'kind': 'train', 'update': run.update, 'loss': loss, 'ema': ema,
            'lr': float(run.schedule(int(m['schedule_count']))) * _lr_scale(run.accum, m['k']),
            'grad_norm': float(m['grad_norm']), 'tokens': stats.tokens_seen,
            'update_tokens': weight, 'skipped': skipped, 'nonfinite': int(m['nonfinite']),
            'first_nonfinite': int(m['first_nonfinite']),
            'skipped_updates': int(m['skipped_updates']),
            'nonfinite_microbatches': int(m['nonfinite_microbatches']),
            'loss_scale': float(m['loss_scale']), 'k': int(m['k']),
            **noise, 'time': time.perf_counter() - run.start}
  run.records.append(record)
  run.writer.write(record)
  _check_nonfinite(run, record, int(m['consecutive_skips']))
  run.log.advance()
  if run.k_plan is not None and run.k_plan.auto:
    _next_auto_k(run, record)
  if run.update % cfg.log_every == 0 or run.update == cfg.steps:
    now = time.perf_counter()
    tok_s = run.window[0] / (now - run.window[1])
    run.window[:] = [0.0, now]
    k = record['k']
    run.log.info(logs.update_line(
        run.update, cfg.steps, loss, ema, record['lr'], k, k, tok_s, record['grad_norm'],
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
  stats = run.stats
  values = {k: float(m[k]) for k in ('g_sq', 'trace_sigma', 'b_simple')}
  if not skipped and math.isfinite(values['g_sq']) and math.isfinite(values['trace_sigma']):
    new = (values['trace_sigma'], values['g_sq'])
    stats.noise_ema = list(new) if stats.noise_ema is None else [
        NOISE_EMA * old + (1 - NOISE_EMA) * v for old, v in zip(stats.noise_ema, new, strict=True)]
  smoothed = math.nan
  if stats.noise_ema is not None and stats.noise_ema[1] > 0:
    smoothed = stats.noise_ema[0] / stats.noise_ema[1]
  return values | {'b_simple_ema': smoothed}


def evaluate(run: Run) -> dict:
  """Token-weighted eval loss of the current params; recorded as the run's last eval."""
  sums = [jax.device_get(run.eval_sums(run.state.params, b)) for b in run.eval_set]
  loss = sum(float(s) for s, _ in sums) / sum(float(w) for _, w in sums)
  run.stats.last_eval = {'kind': 'eval', 'update': run.update, 'loss': loss,
                         'perplexity': math.exp(loss), 'tokens': run.stats.tokens_seen}
  return run.stats.last_eval


def _after_update(run: Run):
  """Periodic eval and checkpoint after an update."""
  cfg, update = run.cfg, run.update
  if update % cfg.eval_every == 0 or update == cfg.steps:
    record = evaluate(run)
    run.records.append(record)
    run.writer.write(record)
    run.log.info(f'eval   [{update}/{cfg.steps}] loss {record["loss"]:.4f} '
                 f'ppl {record["perplexity"]:.2f}')
    run.window[1] = time.perf_counter()  # eval time is not training throughput
  if run.saving and ((cfg.save_every and update % cfg.save_every == 0) or update == cfg.steps):
    save(run)


def preempted(run: Run) -> dict:
  """Checkpoints where the run is (mid-cycle included) and says how to continue."""
  path = save(run)
  run.ckpt.wait()
  run.writer.close()
  run.log.close()
  calls = int(run.state.cycle_microbatch)
  run.log.info(f'preempted: checkpoint written to {path} (update {run.update}, '
               f'{calls}/{run.accum.num_microbatches} micro-batches into the '
               f'next); continue with --resume')
  return {'kind': 'preempted', 'update': run.update, 'checkpoint': str(path), 'preempted': True}


def _train_loop(run: Run, should_stop) -> dict | None:
  """Updates until `cfg.steps`; the preemption result if stopped early, else None."""
  run.window[:] = [0.0, time.perf_counter()]
  run.log.start_progress(run.cfg.steps, initial=run.update)
  while run.update < run.cfg.steps:
    m = train_update(run, should_stop)
    if m is None:
      return preempted(run)
    record_update(run, m)
    _after_update(run)
    if should_stop() and run.update < run.cfg.steps:
      return preempted(run)
  return None


def finish(run: Run, resumed: bool) -> dict:
  """The final eval (if not just done), summary record, loss plot and summary table."""
  run.log.close()
  stats, state = run.stats, run.state
  ema = math.nan if stats.ema is None else stats.ema
  if stats.last_eval is None or stats.last_eval['update'] != run.update:
    evaluate(run)
  wall = time.perf_counter() - run.start
  fp = fingerprint(state.params)
  train = [r for r in run.records if r['kind'] == 'train']
  summary = {
      'kind': 'summary', 'updates': run.update,
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
  run.writer.write(summary)
  run.writer.close()
  if run.main_process:
    logs.plot_losses(run.records, run.out / 'loss.png',
                     title=f'{run.accum.mode}, K={run.accum.num_microbatches}, '
                           f'{describe(run.accum)["tokens_per_update"]:,} tokens/update, '
                           f'{run.cfg.precision}')
    if run.accum.noise_stats:
      logs.plot_noise(run.records, run.out / 'noise_scale.png')
  run.log.table('summary', [
      ('updates', run.update),
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
  open_outputs(run, resumed=resumed)
  run.start = time.perf_counter()
  try:
    stopped = _train_loop(run, should_stop)
    if run.ckpt:
      run.ckpt.wait()  # surfaces a failed background save as an error here
  except NonFiniteError:
    run.writer.close()
    run.log.close()
    raise
  finally:
    if run.ckpt:
      run.ckpt.close()
  return stopped if stopped is not None else finish(run, resumed=resumed)
