"""A run's parts, built from its settings: data, model, optimizer, train step, state.

`build_run(cfg, out, log)` makes a `Run` (fresh, or resumed from out/checkpoints) and takes the
output directory's lock; `evaluate` measures the current params on the eval set. The loop that
trains a run is train.py; what a run writes and says is report.py.
"""

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable

import jax

from accumjax import loop, parallel
from accumjax import state as state_lib
from accumjax.checkpoint import Checkpointer
from accumjax.config import AccumConfig
from accumjax.errors import ConfigError
from accumjax.lm import config as config_lib
from accumjax.lm import data as data_lib
from accumjax.lm import faults as faults_lib
from accumjax.lm import logs
from accumjax.lm.build import build_optimizer, make_loss_fn, make_mesh, plan_for_budget
from accumjax.lm.config import ON_CONFIG_CHANGE, TrainConfig
from accumjax.lm.guards import RunLock, check_host_memory
from accumjax.lm.model import live_set, make_lm, num_params
from accumjax.lm.resume import resume_state
from accumjax.losses import token_cross_entropy
from accumjax.precision import cast_floats
from accumjax.state import init_train_state
from accumjax.step import jit_train_step, make_train_step


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


# B_simple is smoothed as the paper does (accumjax.noise.SmoothedNoiseScale): numerator and
# denominator separately (one update's g_sq is a difference of noisy terms and can be <= 0),
# over ~10 updates. Early in training,
# when |G|^2 falls by orders of magnitude within tens of updates, the smoothed value lags: the
# large early terms dominate both sums until they have decayed (the per-update values do not).
NOISE_EMA = 0.9


@dataclasses.dataclass
class Progress:
  """What changes while a run trains: the state and the loop's bookkeeping (train.py and
  report.py update it; nothing else of a Run changes)."""
  state: object
  stats: RunStats
  update: int = 0  # updates done
  microbatches: int = 0  # micro-batches done (the Orbax step of a save)
  position: int = 0  # calls already made in the cycle in progress (host count; see train.py)
  pending: dict | None = None  # a dispatched update's metrics, not read yet (see train.py)
  ckpt: Checkpointer | None = None  # once the run saves or has restored
  last_saved: int | None = None
  records: list = dataclasses.field(default_factory=list)
  writer: logs.MetricsWriter | None = None
  start: float = 0.0
  mark: float = 0.0  # when training time was last counted (see train._read)
  window: list = dataclasses.field(default_factory=lambda: [0.0, time.perf_counter()])


@dataclasses.dataclass(frozen=True)
class Run:
  """A run being trained: what was built from its settings, and its `progress`."""
  cfg: TrainConfig
  accum: AccumConfig
  mesh: object
  out: pathlib.Path
  log: logs.Logger
  step: Callable
  rows: data_lib.RowIterator
  faults: dict
  schedule: Callable
  eval_set: list
  eval_sums: Callable
  info: dict
  progress: Progress
  plan: object = None
  k_plan: object = None  # config.KPlan when K changes between updates
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


def build_run(cfg: TrainConfig, out, log, resume=None, on_config_change='refuse') -> Run:
  """Everything a run needs, from its settings (and its checkpoint, when resuming)."""
  mesh = make_mesh(cfg.mesh)
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
  train_split, eval_split = data_lib.load_splits(cfg.data, cfg.accum.seq_len, cfg.pack)
  apply, params = make_lm(cfg.model, seed=cfg.seed)
  faults = faults_lib.parse(cfg.inject_faults, accum.num_microbatches)
  loss_fn = make_loss_fn(apply)
  if faults:
    loss_fn = faults_lib.with_faults(loss_fn)
  tx, schedule = build_optimizer(cfg, accum)
  # Everything is checked: from here on the run writes (a checkpoint restore may move broken
  # checkpoints aside), so it takes the directory's lock first, and gives it back if anything
  # below fails.
  lock = RunLock(out).acquire() if jax.process_index() == 0 else None
  try:
    state, ckpt, meta = _initial_state(cfg, accum, tx, params, out, log, mesh, resume,
                                       on_config_change, train_split.fingerprint)
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
    # Eval is small: its batches are replicated and every device evaluates them whole. A batch
    # is a global micro-batch (micro-batch size x devices rows), so the same global run on 1
    # device and on 4 evaluates the same rows.
    eval_rows = cfg.accum.microbatch_size * mesh.size
    eval_set = parallel.replicate(
        data_lib.eval_batches(eval_split, eval_rows, cfg.eval_batches), mesh)
    state = parallel.place_state(state, mesh)
    info = {
        'memory_plan': dataclasses.asdict(plan) if plan else None,
        'devices': [str(d) for d in mesh.devices.flat], 'processes': jax.process_count(),
        'num_params': num_params(params),
        'data': data_lib.describe_corpus(cfg.data),
        'train_files': train_split.num_files, 'train_bytes': train_split.num_bytes,
        'train_rows': int(len(train_split.lengths)), 'eval_files': eval_split.num_files,
        'train_fingerprint': train_split.fingerprint,
        'eval_rows_used': len(eval_set) * eval_rows,
        'resumed_at_update': int(state.update_step),
        'mesh': dict(mesh.shape),
        'state_bytes_per_device': state_lib.state_bytes_per_device(state, accum),
        'live_bytes_per_device': live_set(cfg.model, state, accum, parallel.fsdp_size(mesh)),
    }
    progress = Progress(state=state, stats=stats, update=int(state.update_step),
                        microbatches=state_lib.microbatches_seen(state),
                        position=loop.calls_done(state, accum), ckpt=ckpt)
    return Run(cfg=cfg, accum=accum, mesh=mesh, out=out, log=log, step=step, rows=rows,
               faults=faults, schedule=schedule, eval_set=eval_set,
               eval_sums=_eval_fn(apply, accum.compute_jnp_dtype), info=info, plan=plan,
               k_plan=k_plan, lock=lock, progress=progress)
  except BaseException:
    if lock is not None:
      lock.release()
    raise


def update_k(run: Run) -> int:
  """K of the update that runs next (or is in progress)."""
  prog = run.progress
  return _k_for(run.cfg, run.k_plan, prog.stats, prog.update) if run.k_plan else \
      run.accum.num_microbatches


def _k_for(cfg, k_plan, stats, update) -> int:
  if k_plan is None:
    return cfg.num_microbatches()
  return stats.k if k_plan.auto else k_plan.schedule.at(update)


def _check_k_on_resume(cfg, k_plan, meta, state, stats):
  """A checkpoint in the middle of an update must be finished with the K it started with."""
  position = state_lib.cycle_microbatches(state)
  if not position:
    return
  saved_cfg = config_lib.from_flat({'noise_stats': False, **meta['config']})
  saved_plan = config_lib.k_plan(saved_cfg)
  update = int(meta['update'])
  before = _k_for(saved_cfg, saved_plan, stats, update) if saved_plan else \
      saved_cfg.num_microbatches(meta.get('num_devices', 1))
  now = _k_for(cfg, k_plan, stats, update) if k_plan else None
  if k_plan is not None and now != before:
    raise ConfigError(
        f'the checkpoint is {position} micro-batches into update '
        f'{update + 1}, which started with K={before}; the new K plan gives it K={now}. Resume '
        'with the saved --grad-accum-schedule / --grad-accum-steps, or change them at an update '
        'boundary.')


def evaluate(run: Run) -> dict:
  """Token-weighted eval loss of the current params; recorded as the run's last eval."""
  prog = run.progress
  sums = [jax.device_get(run.eval_sums(prog.state.params, b)) for b in run.eval_set]
  loss = sum(float(s) for s, _ in sums) / sum(float(w) for _, w in sums)
  prog.stats.last_eval = {'kind': 'eval', 'update': prog.update, 'loss': loss,
                         'perplexity': math.exp(loss), 'tokens': prog.stats.tokens_seen}
  return prog.stats.last_eval
