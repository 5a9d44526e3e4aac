"""Resuming a run: reconcile the saved config with the new one, restore, convert.

What may change on resume (see docs/reliability.md): harmless settings always; the
accumulation setup at a cycle boundary, or mid-cycle only with the `flush` policy; anything
that changes the math never. Checkpoints store the settings flat (`config.to_flat`), so the
comparison is by flat name and every message names the flag.
"""

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import optax

from accumjax import parallel
from accumjax.checkpoint import Checkpointer, CheckpointError, json_safe
from accumjax.core import ConfigError, zero_noise
from accumjax.lm import config as config_lib
from accumjax.lm.build import build_optimizer, lr_schedule
from accumjax.lm.config import TrainConfig
from accumjax.optim import as_opt_params
from accumjax.state import cycle_microbatches, empty_cycle, init_train_state, needs_cycle
from accumjax.step import make_flush

# The TrainState's layout in checkpoints (meta 'state_layout'). 2: the update in progress is
# `state.cycle`. Layout 1 (no 'state_layout' in the meta) kept the sums inside
# optax.MultiStepsState in the optimizer state.
STATE_LAYOUT = 2


def compare_configs(saved: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
  """(changed accumulation settings, changed settings that change the math), by flat name.

  Harmless settings (logging, eval, saving, --steps) may always change. Everything else that
  is not an accumulation setting (model, data, seed, precision, optimizer, schedule...) changes
  what the resumed run computes, so it is refused.
  """
  new = config_lib.to_flat(cfg)
  unknown = sorted(set(saved) - set(new))
  if unknown:
    raise ConfigError(f'the checkpoint was written with unknown settings {unknown}.')
  changed = [k for k in new if k in saved and saved[k] != new[k]
             and config_lib.on_resume(k) != 'harmless']
  return ([k for k in changed if config_lib.on_resume(k) == 'accumulation'],
          [k for k in changed if config_lib.on_resume(k) is None])


def _describe_change(saved: dict, cfg: TrainConfig, names) -> str:
  new = config_lib.to_flat(cfg)
  return ', '.join(f'{config_lib.flag(k)} {saved[k]!r} -> {new[k]!r}' for k in names)


@dataclasses.dataclass
class _Saved:
  """The run a checkpoint was written by: its settings and accumulating optimizer."""
  flat: dict
  accum: object
  tx: object

  @classmethod
  def of(cls, meta: dict) -> '_Saved':
    # Checkpoints from before --noise-stats existed hold no noise sums.
    cfg = config_lib.from_flat({'noise_stats': False, **meta['config']})
    accum = config_lib.validate(cfg, meta.get('num_devices', 1))
    return cls(meta['config'], accum, build_optimizer(cfg, accum)[0])


def _convert_setup(state, tx, params, accum):
  """Moves a cycle-boundary state between accumulation setups (scan <-> multisteps/hybrid,
  other K, optax.MultiSteps <-> own cycle): the optimizer's own state carries over, the
  (empty) cycle and any MultiSteps wrapper are rebuilt for `accum`."""
  old = state.opt_state
  inner = old.inner_opt_state if isinstance(old, optax.MultiStepsState) else old
  new = tx.init(as_opt_params(params))
  if isinstance(new, optax.MultiStepsState):
    new = new._replace(inner_opt_state=inner, gradient_step=jnp.copy(state.update_step))
  else:
    new = inner
  cycle = empty_cycle(params, accum) if needs_cycle(accum) else None
  return state._replace(opt_state=new, cycle=cycle)


def _convert_impl(state, tx, accum):
  """--multisteps-impl changed (a harmless setting, also mid-cycle): the same cycle, with
  optax.MultiSteps' wrapper around the optimizer's own state dropped, or added with the
  cycle's sums as its accumulator (optax.MultiSteps keeps its own copy)."""
  old = state.opt_state
  wants = isinstance(tx, optax.MultiSteps)
  if isinstance(old, optax.MultiStepsState) == wants:
    return state
  if not wants:
    return state._replace(opt_state=old.inner_opt_state)
  fresh = tx.init(as_opt_params(state.params))
  sums = state.cycle.sums._replace(noise=None)
  # copies (jnp.array), never the cycle's or the state's own buffers: the step donates both
  return state._replace(opt_state=fresh._replace(
      inner_opt_state=old,
      acc_grads=jax.tree.map(lambda f, x: jnp.array(x, f.dtype), fresh.acc_grads, sums),
      mini_step=jnp.array(state.cycle.microbatches // accum.per_call, fresh.mini_step.dtype),
      gradient_step=jnp.array(state.update_step, fresh.gradient_step.dtype)))


def _check_layout(meta: dict):
  if meta.get('state_layout', 1) != STATE_LAYOUT:
    raise CheckpointError(
        f'checkpoint {meta["step"]} was written by an accumjax whose train state kept the '
        f'update in progress inside optax.MultiStepsState (state layout '
        f'{meta.get("state_layout", 1)}); this one keeps it in the state\'s own cycle (layout '
        f'{STATE_LAYOUT}) and cannot read it. Finish that run with the accumjax that wrote it '
        '(commit fe729be or earlier), or start a new run in another --out.')


def _check_unchanged(meta: dict, cfg: TrainConfig, data_fingerprint: str | None):
  """Refuses a resume whose data content or schedule length differs from the checkpoint's."""
  saved = meta.get('data_fingerprint')  # absent in checkpoints written before it was recorded
  if data_fingerprint and saved and saved != data_fingerprint:
    raise ConfigError(
        f'the training data changed since checkpoint {meta["step"]} was written (content '
        f'fingerprint {saved} -> {data_fingerprint}, --data {cfg.data!r}): the saved data '
        'position would point at other rows. Resume with the same data, or start a new run in '
        'another --out.')
  old_steps = meta['config'].get('steps', cfg.steps)
  if old_steps != cfg.steps:
    # The schedule may depend on --steps (cosine decays over them). Allowed only if every
    # update already done had the same learning rate under both, so the resumed run is the
    # run one would have made with the new --steps from the start.
    done = int(meta.get('update', 0))
    old = lr_schedule(config_lib.replace(cfg, steps=old_steps))
    new = lr_schedule(cfg)
    differ = [u for u in range(done) if float(old(u)) != float(new(u))]
    if differ:
      raise ConfigError(
          f'--steps {old_steps} -> {cfg.steps} on resume would change the learning rate of '
          f'updates already done (from update {differ[0] + 1} on: {float(old(differ[0])):.3g} '
          f'vs {float(new(differ[0])):.3g}; the {cfg.schedule} schedule spans --steps), so the '
          f'rate would jump mid-run. Resume with --steps {old_steps}, or start a new run.')


def resume_state(ckpt: Checkpointer, step, cfg, accum, tx, params, on_config_change, log,
                 mesh=None, data_fingerprint: str | None = None):
  """Restores the newest good checkpoint and reconciles its config with `cfg`.

  The state is restored on `mesh` in its layout (`parallel.state_shardings`: replicated, or
  sharded over fsdp), whatever mesh wrote it (the accumulated sums are already global), or
  on the default device without one. A
  checkpoint of other training data (by content) or, under a cosine schedule, another
  --steps is refused. Returns (state, meta).
  """
  saved_runs = {}

  def target(meta):
    _check_layout(meta)
    _check_unchanged(meta, cfg, data_fingerprint)
    _, math_names = compare_configs(meta['config'], cfg)
    if math_names:
      raise ConfigError(
          f'cannot resume from step {meta["step"]} with a different '
          f'{_describe_change(meta["config"], cfg, math_names)}: it changes what the run '
          'computes. Resume with the saved values, or start a new run in another --out.')
    saved_runs[meta['step']] = saved = _Saved.of(meta)
    fresh = init_train_state(params, saved.tx, cfg.seed, saved.accum)
    return fresh if mesh is None else parallel.abstract_state(fresh, mesh)

  restored = ckpt.restore(target, step=None if step in (None, True, 'latest') else int(step),
                          move_aside=True)
  for s, why in restored.skipped:
    log.info(f'resume: skipped checkpoint {s}: {why}')
  for s, where in restored.moved:
    log.info(f'resume: moved checkpoint {s} aside to {where} (newer than the one resumed; '
             'kept for inspection)')
  state, meta, saved = restored.state, restored.meta, saved_runs[restored.step]
  where = (f'update {int(state.update_step)}, {cycle_microbatches(state)}/'
           f'{saved.accum.num_microbatches} micro-batches into the next')
  log.info(f'resume: checkpoint {restored.step} ({where}) from {ckpt.path(restored.step)}')
  # What an update is made of: K micro-batches of the same global rows (micro-batch x devices)
  # in the same calls. The mesh may change mid-cycle if that stays (fsdp=4 -> data=2,fsdp=2, or
  # 4 devices x 1 row -> 1 device x 4 rows): the saved sums are global, already reduced.
  shape = lambda a: (a.num_microbatches, a.microbatch_size * a.num_devices, a.mode, a.per_call)
  if shape(saved.accum) == shape(accum) and (saved.flat.get('mesh') != cfg.mesh or
                                              saved.accum.num_devices != accum.num_devices):
    log.info(f'resume: mesh {saved.flat.get("mesh") or "auto"} ({saved.accum.num_devices} '
             f'device(s)) -> {cfg.mesh or "auto"} ({accum.num_devices}); the same '
             f'{accum.microbatch_size * accum.num_devices} rows per micro-batch over the mesh, '
             'so the update goes on where it was')
  if shape(saved.accum) != shape(accum):
    accum_names, _ = compare_configs(saved.flat, cfg)
    change = ', '.join(
        [_describe_change(saved.flat, cfg, accum_names)] * bool(accum_names) +
        [f'devices {saved.accum.num_devices} -> {accum.num_devices}'] *
        (saved.accum.num_devices != accum.num_devices))
    if cycle_microbatches(state) > 0:
      if on_config_change != 'flush':
        raise ConfigError(
            f'checkpoint {restored.step} is mid-cycle ({where}); changing {change} now would '
            'mix two accumulation setups in one update. Resume with the saved values, or pass '
            '--on-config-change flush to apply the partial cycle as its own update first.')
      state, _ = jax.jit(make_flush(saved.tx, saved.accum))(state)
      log.info(f'resume: flushed the partial cycle as update {int(state.update_step)} '
               f'(exact for the micro-batches it had) before changing {change}')
    state = _convert_setup(state, tx, params, accum)
    log.info(f'resume: accumulation changed at a cycle boundary: {change}')
  return _convert_noise(_convert_impl(state, tx, accum), accum, log), meta


def _convert_noise(state, accum, log):
  """Adds or drops the cycle's noise sums when --noise-stats changed (a harmless setting: the
  params do not depend on it). Switched on mid-cycle, the cycle's earlier micro-batches are not
  in the sums: that update reports NaN (no samples counted), never a number from part of it.
  Scan mode keeps no cycle: nothing to convert."""
  cycle = state.cycle
  if cycle is None or accum.noise_stats == (cycle.sums.noise is not None):
    return state
  if not accum.noise_stats:
    return state._replace(cycle=cycle._replace(sums=cycle.sums._replace(noise=None)))
  noise = zero_noise()
  if int(cycle.microbatches) > 0:
    noise = noise._replace(samples=jnp.full((), -jnp.inf, jnp.float32))
    log.info('resume: --noise-stats switched on mid-cycle: this update reports no noise '
             'statistics, the next ones do')
  # build_run places the state on the mesh
  return state._replace(cycle=cycle._replace(sums=cycle.sums._replace(noise=noise)))


def _parse(line: str):
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None  # e.g. a last line half-written when the run was killed
  if not isinstance(record, dict) or 'kind' not in record:
    return None
  if record['kind'] in ('train', 'eval'):  # null: no finite value (see MetricsWriter)
    record = {k: math.nan if v is None else v for k, v in record.items()}
  return record


def trim_metrics(path: pathlib.Path, update: int) -> list[dict]:
  """Keeps the records up to `update` (a crash may have logged updates after the checkpoint,
  or left a half-written line: unreadable lines are dropped)."""
  if not path.exists():
    return []
  records = [r for r in map(_parse, path.read_text().splitlines()) if r is not None]
  records = [r for r in records if r['kind'] != 'summary' and r.get('update', 0) <= update]
  path.write_text(''.join(json.dumps(json_safe(r), allow_nan=False) + '\n' for r in records))
  return records
