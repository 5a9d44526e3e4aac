"""The one train step that every mode uses, as two programs that say what they touch.

`make_train_step(loss_fn, optimizer, config)` returns `train_step(state, batch, last_call)`, a
pure function built from two programs:

- `train_step.accumulate(cycle, params, batch, rng, update_step, loss_scale, model_state) ->
  (cycle, metrics)`: an interim call. It reads the params, the model state and the key, and
  changes only the cycle (`state.Cycle`): the call's micro-batches are summed into it.
- `train_step.update(state, batch) -> (state, metrics)`: the call that completes an update.
  The call's micro-batches are summed into the cycle, the optimizer runs once on the cycle's
  totals, and the counters, loss scale and model state follow; the cycle starts afresh.
  `update(state, None)` applies the cycle as it stands (a cycle cut short by the end of the
  data: see `make_flush`).

`jit_train_step` jits each once, donating what it changes (the cycle; the state), so an
interim call costs the gradient and the add, not the optimizer state's buffers. Which program
a call runs is the caller's count (`loop.run_update` passes `last_call`), and neither can
break the cycle: `update` applies whatever the cycle holds. Modes:

- scan: the call gets K micro-batches and is always `update` (no cycle between calls);
- multisteps: 1 micro-batch per call, `update` every K calls;
- hybrid: c micro-batches per call, `update` every K / c calls.

Under `multisteps_impl='optax'` every call runs `update` and `optax.MultiSteps`, as shipped,
decides when its cycle ends (the reference the own cycle is checked against).
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from accumjax import model_state as ms
from accumjax import optim, parallel
from accumjax.config import AccumConfig
from accumjax.core import (
    ConfigError,
    GradSums,
    _sq_norm,
    check_loss_fn,
    count_nonfinite_sum,
    noise_scale,
    normalize,
    scan_microbatches,
)
from accumjax.precision import with_compute_dtype
from accumjax.state import (
  Cycle,
  TrainState,
  accumulator_to,
  cycle_microbatches,
  empty_cycle,
  init_train_state,
  needs_cycle,
)

__all__ = ['TrainState', 'init_train_state', 'jit_train_step', 'make_flush', 'make_train_step']


def _call_sums_fn(loss_fn, config: AccumConfig, mesh, state_rules=None):
  """`(params, batch, rng_data, index_offset, n, loss_scale, model_state, state_acc) ->
  (GradSums, bad_N, call_acc)`: the core over one call's micro-batches, on one device or
  reduced over the mesh (call_acc: the call's own model-state accumulator, or None)."""
  compute_loss = with_compute_dtype(loss_fn, config.compute_jnp_dtype)
  clip_each = config.clip_norm if config.clip_before_accumulation else None
  kwargs = dict(accum_dtype=config.accum_jnp_dtype, clip_microbatch_norm=clip_each,
                noise_stats=config.noise_stats, mask_microbatches=config.masks_microbatches)
  devices = config.num_devices
  if mesh is not None:
    if mesh.size != devices:
      raise ConfigError(f'the mesh has {mesh.size} devices but num_devices={devices}.')
    return parallel.reduced_sums(compute_loss, mesh, config.dp_reduction, state_rules,
                                 fsdp_reduce=config.fsdp_reduce, fsdp_gather=config.fsdp_gather,
                                 compute_dtype=config.compute_jnp_dtype, **kwargs)
  if devices != 1:
    raise ConfigError(f'num_devices={devices} needs a mesh of {devices} devices '
                      '(make_train_step(..., mesh=parallel.make_mesh())).')

  def call_sums(params, batch, rng_data, index_offset, n, loss_scale, model_state, state_acc):
    start_acc = None if model_state is None else ms.restart(state_acc, state_rules)
    sums, _, bad_N, call_acc = scan_microbatches(
        compute_loss, params, batch, num_microbatches=n,
        rng=jax.random.wrap_key_data(rng_data), index_offset=index_offset,
        loss_scale=loss_scale, model_state=model_state, state_rules=state_rules,
        state_acc=start_acc, **kwargs)
    return sums, bad_N, call_acc

  return call_sums


def _microbatches_in(batch, config: AccumConfig) -> int:
  """Micro-batches in a call's batch (static), or a ConfigError naming the rows."""
  rows = jax.tree.leaves(batch)[0].shape[0]
  b, c, devices = config.microbatch_size, config.per_call, config.num_devices
  if rows % (b * devices) or not 1 <= rows // (b * devices) <= c:
    raise ConfigError(
        f'a {config.mode} call takes {c} micro-batch(es) of {b} rows on each of {devices} '
        f'device(s) ({c * b * devices} rows, or fewer whole micro-batches at the end of the '
        f'data); got {rows} rows.')
  return rows // (b * devices)


def _add_call(call_sums, config, state_rules, cycle: Cycle | None, params, batch, rng,
              update_step, loss_scale, model_state):
  """One call's micro-batches summed into `cycle` (None: an empty one). Returns (the call's
  own sums, the cycle with them)."""
  n = _microbatches_in(batch, config)
  rng_data = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(rng), update_step))
  start = jnp.zeros((), jnp.int32) if cycle is None else cycle.microbatches
  start_acc = None
  if model_state is not None:
    start_acc = ms.init_acc(model_state, state_rules)
    if cycle is not None:  # a cycle's start is this step's own (whatever rules made the state)
      start_acc = jax.tree.map(lambda f, a: jnp.where(start == 0, f, a.astype(f.dtype)),
                               start_acc, cycle.model_acc)
      cycle = cycle._replace(model_acc=start_acc)
  sums, bad_N, call_acc = call_sums(params, batch, rng_data, start, n, loss_scale, model_state,
                                    start_acc)
  found = jnp.where(jnp.any(bad_N), start + jnp.argmax(bad_N), -1).astype(jnp.int32)
  if cycle is None:  # scan mode: the call is the whole cycle (no add of zeros)
    return sums, Cycle(sums, start + n, found, call_acc)
  return sums, add_to_cycle(cycle, sums, n, found, call_acc, state_rules)


def add_to_cycle(cycle: Cycle, sums: GradSums, n, first_nonfinite=-1, model_acc=None,
                 state_rules=None) -> Cycle:
  """The cycle with one call's sums of `n` micro-batches added (`first_nonfinite`: the
  call's first non-finite micro-batch, as a cycle index, or -1; `model_acc`: the call's own
  model-state accumulator). All an interim call does besides the gradients."""
  first = jnp.where(cycle.first_nonfinite >= 0, cycle.first_nonfinite, first_nonfinite)
  totals = jax.tree.map(lambda a, s: (a + s).astype(a.dtype), cycle.sums, sums)
  if model_acc is not None:
    model_acc = ms.merge(cycle.model_acc, model_acc, state_rules)
  return Cycle(totals, cycle.microbatches + n, first.astype(jnp.int32), model_acc)


def _update_scale(config: AccumConfig, microbatches):
  """(K / base K) ** power for an update of `microbatches` micro-batches (per device), or None
  without lr batch scaling."""
  if not config.lr_power:
    return None
  ratio = jnp.asarray(microbatches, jnp.float32) / config.base_k
  return ratio if config.lr_power == 1.0 else ratio ** jnp.float32(config.lr_power)


def _optimize(tx, config: AccumConfig, call_sums: GradSums, cycle: Cycle, state: TrainState,
              flush: bool):
  """The optimizer on the cycle's totals, applied: (cycle, params, opt_state, updated,
  applied, grad_norm); the cycle comes back with a non-finite gradient sum counted (one check
  per update, where the core did not check each micro-batch).

  Own cycle: `Normalized.apply`, on a squared norm of the totals read once (the metric, the
  clip and the finiteness check share it); this call completes the update (a flush: if
  anything is pending). Under `optax.MultiSteps` it sees this call's sums and decides itself
  whether its cycle ended."""
  scale = _update_scale(config, cycle.microbatches)
  if isinstance(state.opt_state, optax.MultiStepsState):
    opt_state = state.opt_state
    strip = call_sums._replace(noise=None)
    if flush:
      updated = cycle.microbatches > 0
      updates, opt_state = optim.flush_multisteps(tx, opt_state, state.params, updated)
    else:
      updates, opt_state = tx.update(strip, opt_state, optim.as_opt_params(state.params))
      updated = opt_state.mini_step == 0
    params = optim.apply_updates(state.params, updates.grads, scale)
    grad_norm = jnp.sqrt(_sq_norm(normalize(cycle.sums)[0]))
    return cycle, params, opt_state, updated, updated & (updates.weight > 0), grad_norm
  if isinstance(tx, optax.MultiSteps):
    raise ConfigError('the state holds no optax.MultiStepsState but the train step was built '
                      "for multisteps_impl='optax': init_train_state(..., config=config).")
  sq_norm = _sq_norm(cycle.sums.grads)
  if not config.masks_microbatches:  # one check of the update's gradient (core)
    cycle = cycle._replace(sums=count_nonfinite_sum(cycle.sums, sq_norm))
  done = tx.apply(cycle.sums._replace(noise=None), state.opt_state, state.params,
                  sq_norm=sq_norm, update_scale=scale)
  updated = cycle.microbatches > 0 if flush else jnp.ones((), bool)
  return cycle, done.params, done.opt_state, updated, updated & done.applied, done.grad_norm


def _counters(state: TrainState, config: AccumConfig, cycle: Cycle, updated, applied) -> dict:
  """The update count, fault counters and loss scale after this call (field updates)."""
  bad = cycle.sums.nonfinite > 0
  fault_skip = updated & ~applied & bad
  done = lambda x: jnp.where(updated, x, 0).astype(jnp.int32)
  fields = dict(
      update_step=state.update_step + updated.astype(jnp.int32),
      microbatch_step=state.microbatch_step + done(cycle.microbatches),
      nonfinite_microbatches=state.nonfinite_microbatches + done(cycle.sums.nonfinite),
      skipped_updates=state.skipped_updates + fault_skip.astype(jnp.int32),
      consecutive_skips=jnp.where(
          fault_skip, state.consecutive_skips + 1,
          jnp.where(updated, 0, state.consecutive_skips)))
  if config.loss_scaling:
    # Once per update: an overflow anywhere in the cycle halves the scale; growth_interval
    # applied updates in a row without one double it.
    overflow = updated & bad
    good = state.loss_scale_good + (applied & ~bad).astype(jnp.int32)
    grow = good >= config.loss_scale_growth_interval
    fields['loss_scale'] = jnp.where(
        overflow, state.loss_scale * 0.5, jnp.where(grow, state.loss_scale * 2.0,
                                                     state.loss_scale))
    fields['loss_scale_good'] = jnp.where(overflow | grow, 0, good)
  return fields


def _next_cycle(cycle: Cycle, updated, state_rules, model_state):
  """The cycle after an emitting call: afresh where the update completed (exact +0 computed
  from the sums, not a broadcast over the donated buffers), else as it stands."""
  fresh = Cycle(
      jax.tree.map(optim.zeros_from, cycle.sums), jnp.zeros_like(cycle.microbatches),
      jnp.full_like(cycle.first_nonfinite, -1),
      None if model_state is None else ms.init_acc(model_state, state_rules))
  return jax.tree.map(lambda f, c: jnp.where(updated, f, c), fresh, cycle)


def _committed_model_state(state: TrainState, cycle: Cycle, state_rules, commit):
  """The model state from the cycle's accumulator, where the update was applied (else the
  cycle's starting state stays, like the params)."""
  new = ms.finalize(state.model_state, cycle.model_acc, state_rules)
  return jax.tree.map(lambda n, o: jnp.where(commit, n, o), new, state.model_state)


def _cycle_metrics(call_sums: GradSums, cycle: Cycle) -> dict:
  """What every call reports: the cycle's loss and weight so far, this call's alone, and the
  cycle's non-finite micro-batches."""
  _, loss = normalize(cycle.sums._replace(grads=None))
  _, call_loss = normalize(call_sums._replace(grads=None))
  return {'loss': loss, 'weight': cycle.sums.weight, 'call_loss': call_loss,
          'call_weight': call_sums.weight, 'nonfinite': cycle.sums.nonfinite,
          'first_nonfinite': cycle.first_nonfinite}


def _update_metrics(state, new_state, call_sums, cycle, updated, applied, grad_norm,
                    config) -> dict:
  """The emitting call's metrics (see make_train_step)."""
  grad_norm = jnp.where(updated, grad_norm, jnp.nan)
  count = optim.schedule_count(state.opt_state)
  noise = {}
  if config.noise_stats:
    stats = noise_scale(cycle.sums, jnp.square(grad_norm))
    noise = {name: jnp.where(updated, v, jnp.nan) for name, v in stats.items()}
  return noise | _cycle_metrics(call_sums, cycle) | {
      'grad_norm': grad_norm, 'updated': updated, 'skipped': updated & ~applied,
      'skipped_updates': new_state.skipped_updates,
      'consecutive_skips': new_state.consecutive_skips,
      'nonfinite_microbatches': state.nonfinite_microbatches + cycle.sums.nonfinite.astype(
          jnp.int32),
      'loss_scale': state.loss_scale,
      'schedule_count': jnp.full((), -1, jnp.int32) if count is None else count,
  }


def apply_cycle(tx, config: AccumConfig, state: TrainState, call_sums: GradSums, cycle: Cycle,
                state_rules=None, flush: bool = False):
  """What a completing call does after summing its micro-batches into `cycle`: the
  optimizer (`tx`, an `optim.accumulating_optimizer`) once on the cycle's totals, the params,
  counters, loss scale and model state that follow, and a fresh cycle. Returns (new state,
  metrics). `flush`: `call_sums` are zeros and nothing may be pending."""
  cycle, params, opt_state, updated, applied, grad_norm = _optimize(
      tx, config, call_sums, cycle, state, flush)
  new_state = state._replace(params=params, opt_state=opt_state,
                             **_counters(state, config, cycle, updated, applied))
  if state_rules is not None:
    new_state = new_state._replace(
        model_state=_committed_model_state(state, cycle, state_rules, applied))
  if state.cycle is not None:
    new_state = new_state._replace(
        cycle=_next_cycle(cycle, updated, state_rules, new_state.model_state))
  return new_state, _update_metrics(state, new_state, call_sums, cycle, updated, applied,
                                    grad_norm, config)


def _require_train_state(state):
  if not isinstance(state, TrainState):
    raise ConfigError(f'state is a {type(state).__name__}; the train step takes the TrainState '
                      'of init_train_state(params, optimizer, rng, config).')


def _check_batch(batch):
  """Every leaf of a call's batch is an array (a string or a list of them is no input to a
  jitted program)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    if not hasattr(leaf, 'dtype') or not hasattr(leaf, 'shape') or leaf.ndim == 0:
      raise ConfigError(
          f'batch{jax.tree_util.keystr(path)} is a {type(leaf).__name__}'
          f'{" scalar" if hasattr(leaf, "ndim") else ""}; every leaf of a batch must be an '
          'array with a leading row axis (numbers, not strings: encode or drop the field).')


def _check_state(state: TrainState, state_rules, config: AccumConfig):
  _require_train_state(state)
  if (state.model_state is None) != (state_rules is None):
    raise ConfigError(
        'the train step and the state disagree about the model state: '
        f'make_train_step(..., state_rules={state_rules!r}) but the state '
        f'{"holds none" if state.model_state is None else "holds one"} '
        '(init_train_state(..., model_state=..., state_rules=...)).')
  if state.cycle is not None and (state.cycle.sums.noise is not None) != config.noise_stats:
    raise ConfigError(
        f'the state\'s cycle {"holds" if state.cycle.sums.noise is not None else "lacks"} '
        f'noise sums but noise_stats={config.noise_stats}: build the state with the step\'s '
        'config (init_train_state(..., config=config)).')


def make_train_step(loss_fn, optimizer, config: AccumConfig, mesh=None, state_rules=None):
  """The train step for `config.mode`: `train_step(state, batch, last_call=None) -> (state,
  metrics)`; jit it once with `jit_train_step` (see the module docstring for its two programs,
  `train_step.accumulate` and `train_step.update`).

  `optimizer` is a plain optax optimizer (e.g. `optax.adamw(3e-4)`): the step divides the
  summed gradients once and runs it once per update (`optim.accumulating_optimizer`).

  `last_call` says whether this call completes its update (the call driver counts calls and
  passes it); None reads the cycle's position from the state (one device read per call) and
  compares it with `config.num_microbatches`.

  `state_rules` (with a state from `init_train_state(..., model_state=...)`): the model has
  state besides its params; `loss_fn(params, batch, rng, model_state)` returns `((loss_sum,
  weight[, aux]), new_state)` and the rules (see `accumjax.model_state`) combine the
  micro-batches' new states into the update's, in every mode and across devices.

  `mesh` (a `parallel.make_mesh()` of `config.num_devices` devices) makes the step data
  parallel: the batch is sharded along `data`, each device accumulates its own rows and the
  devices' sums meet in one `psum` per call (see parallel.py); params and optimizer state are
  replicated on a mesh `make_mesh(data=D)`, and sharded over the `fsdp` axis of a
  `make_mesh(data=D, fsdp=F)` (place the state with `parallel.place_state`). Without a mesh
  the step runs on one device and `config.num_devices` must be 1.

  The batch of a call holds `config.per_call * config.microbatch_size * config.num_devices`
  rows (the global batch; `microbatch_size` is per device). Fewer whole micro-batches are
  accepted too (the end of the data); the weights keep the math exact.

  Metrics of every call: `loss` and `weight` are the cycle's token-weighted loss and total
  weight so far (the whole update's when `updated`); `call_loss`/`call_weight` are this call's
  alone; `nonfinite` counts the cycle's non-finite micro-batches and `first_nonfinite` is the
  cycle index of the first (-1: none); `updated` says whether this call completed an update.
  The completing call adds: `grad_norm`, the norm of the update's mean gradient before
  clipping; `skipped`, an update not applied (zero total weight, or a non-finite micro-batch
  under 'skip_update'/'raise': params and optimizer state left unchanged);
  `skipped_updates`, `consecutive_skips`, `nonfinite_microbatches`, the state's counters after
  the call; `loss_scale`, the scale this update used (1.0 without float16); `schedule_count`,
  the optimizer's count of applied updates before this one (-1 if it keeps none); with
  `config.noise_stats`, `g_sq`, `trace_sigma` and `b_simple` (see `core.noise_scale`; NaN with
  < 2 samples). An interim call reports these as NaN, false or -1.
  """
  if state_rules is not None:
    if isinstance(state_rules, str) and state_rules not in ms.RULES:
      raise ConfigError(f'state_rules={state_rules!r}; allowed: {ms.RULES} or a pytree of them.')
  if loss_fn is not None:  # (make_flush's step sums no batch: no loss, no core)
    check_loss_fn(loss_fn, state_rules is not None)
  call_sums = None if loss_fn is None else _call_sums_fn(loss_fn, config, mesh, state_rules)
  spec = _Spec(optim.accumulating_optimizer(optimizer, config), config, call_sums, state_rules,
               mesh if parallel.fsdp_size(mesh) > 1 else None)

  def train_step(state: TrainState, batch, last_call: bool | None = None):
    return _dispatch(train_step, state, batch, last_call)

  train_step.accumulate = functools.partial(_accumulate, spec)
  train_step.update = functools.partial(_update, spec)
  train_step.config, train_step.own_cycle = config, config.multisteps_impl != 'optax'
  train_step.state_rules = state_rules
  return train_step


class _Spec(NamedTuple):
  """What a train step's programs are built from (static)."""
  tx: Any  # the accumulating optimizer
  config: AccumConfig
  call_sums: Any  # the core over one call (see _call_sums_fn), or None (a flush)
  state_rules: Any
  fsdp_mesh: Any  # the mesh when the state is sharded over fsdp (its outputs are pinned)


def _loss_scale(spec: _Spec, scale):
  return scale if spec.config.loss_scaling else None


def _accumulate(spec: _Spec, cycle, params, batch, rng, update_step, loss_scale,
                model_state=None):
  """The interim program: one call's micro-batches into the cycle (see the module docstring)."""
  host_acc = spec.config.accumulator_memory == 'host'
  if host_acc:
    cycle = accumulator_to(cycle, 'device')
  sums, cycle = _add_call(spec.call_sums, spec.config, spec.state_rules, cycle, params, batch,
                          rng, update_step, _loss_scale(spec, loss_scale), model_state)
  nan = jnp.full((), jnp.nan, jnp.float32)
  metrics = _cycle_metrics(sums, cycle) | {'updated': jnp.zeros((), bool), 'grad_norm': nan}
  if spec.config.noise_stats:
    metrics |= {name: nan for name in ('g_sq', 'trace_sigma', 'b_simple')}
  if spec.fsdp_mesh is not None:
    cycle = parallel.constrain_state(cycle, spec.fsdp_mesh)
  if host_acc:
    cycle = accumulator_to(cycle, 'host')
  return cycle, metrics


def _update(spec: _Spec, state: TrainState, batch=None):
  """The completing program: the call's micro-batches into the cycle, then the update
  (`batch` None: the cycle as it stands, a flush)."""
  config, state_rules = spec.config, spec.state_rules
  _check_state(state, state_rules, config)
  host_acc = config.accumulator_memory == 'host'
  if host_acc:
    state = accumulator_to(state, 'device')
  flush = batch is None
  if flush:
    if state.cycle is None:
      raise ConfigError('make_flush: the state has no cycle to flush (scan mode, or a state '
                        'built without config).')
    cycle, sums = state.cycle, jax.tree.map(jnp.zeros_like, state.cycle.sums)
  else:
    sums, cycle = _add_call(spec.call_sums, config, state_rules, state.cycle, state.params,
                            batch, state.rng, state.update_step,
                            _loss_scale(spec, state.loss_scale), state.model_state)
  new_state, metrics = apply_cycle(spec.tx, config, state, sums, cycle, state_rules, flush)
  if spec.fsdp_mesh is not None:
    new_state = parallel.constrain_state(new_state, spec.fsdp_mesh)
  if host_acc:
    new_state = accumulator_to(new_state, 'host')
  return new_state, metrics


def _with_cycle(step, state: TrainState) -> TrainState:
  """The state with an empty cycle where the step needs one and the state (built without a
  config) has none."""
  if state.cycle is not None or not needs_cycle(step.config):
    return state
  cycle = empty_cycle(state.params, step.config, state.model_state, step.state_rules)
  if step.config.accumulator_memory == 'host':
    cycle = accumulator_to(cycle, 'host')
  return state._replace(cycle=cycle)


def _is_last(step, state: TrainState, batch, last_call) -> bool:
  """Whether this call completes its update: `last_call` as given, or from the position."""
  config = step.config
  if last_call is not None:
    if not isinstance(last_call, bool):
      raise ConfigError(f'last_call={last_call!r}; allowed: True, False or None.')
    return last_call
  if state.cycle is None:
    return True
  if isinstance(state.cycle.microbatches, jax.core.Tracer):
    raise ConfigError('under jax.jit pass last_call (True or False): the position in the '
                      'cycle is a traced value (or use jit_train_step).')
  n = _microbatches_in(batch, config)
  return cycle_microbatches(state) + n >= config.num_microbatches


def _program(step, state: TrainState, batch, last_call):
  """Which program a call runs, and its arguments: `update` if the call completes the update
  (or the optimizer is optax.MultiSteps, which sees every call), else `accumulate` on the
  cycle alone."""
  _check_state(state, step.state_rules, step.config)
  _check_batch(batch)
  state = _with_cycle(step, state)
  if not step.own_cycle or _is_last(step, state, batch, last_call):
    return step.update, (state, batch)
  return step.accumulate, (state.cycle, state.params, batch, state.rng, state.update_step,
                           state.loss_scale, state.model_state)


def _dispatch(step, state: TrainState, batch, last_call):
  """One call of the train step (see `_program`)."""
  program, args = _program(step, state, batch, last_call)
  if program is step.update:
    return program(*args)
  cycle, metrics = program(*args)
  return state._replace(cycle=cycle), metrics


class _Jitted:
  """A train step's two programs jitted once each (see `jit_train_step`)."""

  def __init__(self, train_step, donate: bool, jit_kwargs: dict):
    self.config, self.own_cycle = train_step.config, train_step.own_cycle
    self.state_rules = train_step.state_rules
    self.accumulate = jax.jit(train_step.accumulate, donate_argnames='cycle' if donate else (),
                              **jit_kwargs)
    self.update = jax.jit(train_step.update, donate_argnames='state' if donate else (),
                          **jit_kwargs)

  def __call__(self, state: TrainState, batch, last_call: bool | None = None):
    return _dispatch(self, state, batch, last_call)

  def lower(self, state: TrainState, batch, last_call: bool | None = None):
    """The lowered program this call would run (for memory analysis and HLO checks)."""
    program, args = _program(self, state, batch, last_call)
    return program.lower(*args)

  def _cache_size(self) -> int:
    """Programs compiled (interim and completing, per signature seen)."""
    return self.accumulate._cache_size() + self.update._cache_size()


def jit_train_step(train_step, *, donate: bool = True, **jit_kwargs):
  """Jits a train step's two programs once each: an interim call donates the cycle (the only
  part it changes; it reads the params, model state and key without taking them), the
  completing call donates the state. Call the result like the train step.

  `donate=False` keeps the input state alive (e.g. to compare states); `jit_kwargs` go to
  `jax.jit` for both programs.
  """
  if not hasattr(train_step, 'update'):
    raise ConfigError('jit_train_step takes the function make_train_step returned.')
  return _Jitted(train_step, donate, jit_kwargs)


def make_flush(optimizer, config: AccumConfig, state_rules=None, mesh=None):
  """`flush(state) -> (state, metrics)`: the cycle as it stands applied as one update.

  For a cycle cut short (the data ends after j < K micro-batches) in multisteps/hybrid modes:
  the update is exactly the big-batch update on those j micro-batches (and follows
  `config.nonfinite` like any update). Nothing pending: no update (`updated` false). In scan
  mode a call is always a whole update: nothing to flush, the state comes back unchanged.
  A model state (pass the train step's `state_rules`) is committed from the partial cycle's
  micro-batches. Metrics as the completing call's (`call_*` are zero).
  """
  if not needs_cycle(config):
    def flush_nothing(state):
      zero, false = jnp.zeros((), jnp.float32), jnp.zeros((), bool)
      noise = {k: jnp.full((), jnp.nan) for k in ('g_sq', 'trace_sigma', 'b_simple')}
      return state, (noise if config.noise_stats else {}) | {
          'loss': zero, 'weight': zero, 'updated': false, 'skipped': false, 'nonfinite': zero}
    return flush_nothing
  step = make_train_step(None, optimizer, config, mesh=mesh, state_rules=state_rules)
  return lambda state: step.update(_with_cycle(step, state), None)
