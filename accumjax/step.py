"""Training state and the one train step that every mode uses.

`make_train_step(loss_fn, tx, config)` returns a pure function `(state, batch) -> (state,
metrics)` to be jitted once. A call scans the micro-batches it is given through
`accumulate_sums` and hands the sums to the accumulating optimizer of `optim.py`:

- scan: the call gets K micro-batches and the optimizer steps every call;
- multisteps: the call gets 1 micro-batch, MultiSteps steps every K calls;
- hybrid: the call gets c micro-batches, MultiSteps steps every K / c calls.

The state also carries the fault counters (updates skipped for non-finite values, non-finite
micro-batches, the current run of consecutive skips, the first bad micro-batch of the cycle)
and, for float16, the dynamic loss scale; all of them are adjusted once per update, on the
call that completes it, so they are checkpointed with everything else.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from accumjax import donation, optim, parallel
from accumjax import model_state as ms
from accumjax.config import AccumConfig
from accumjax.core import (
    ConfigError,
    _sq_norm,
    noise_scale,
    normalize,
    scan_microbatches,
    zero_noise,
)
from accumjax.precision import with_compute_dtype


class TrainState(NamedTuple):
  """Everything a run needs to continue; a pytree of arrays (checkpointable).

  Attributes:
    params: float32 params.
    opt_state: the accumulating optimizer's state (MultiStepsState outside scan mode).
    rng: base key as raw uint32 key data (checkpointable); micro-batch j of update u uses
      fold_in(fold_in(key, u), j).
    update_step: optimizer updates done (skipped zero-weight updates included).
    cycle_microbatch: micro-batches already summed into the current, unfinished update.
    microbatch_step: micro-batches processed since the start, strictly increasing.
    skipped_updates: updates skipped because a micro-batch was non-finite (under
      'skip_microbatch', only those where no micro-batch was left). Zero-weight skips are not
      faults and are not counted here (the `skipped` metric marks both).
    consecutive_skips: such skips in a row, up to now (0 after any completed update that
      was not one).
    nonfinite_microbatches: micro-batches with a non-finite loss or gradient, since the start.
    cycle_first_nonfinite: index within the current cycle of its first non-finite
      micro-batch, -1 if none (kept across calls and checkpoints, for the 'raise' message).
    loss_scale: float32 dynamic loss scale (float16 compute); 1.0 and unused otherwise.
    loss_scale_good: updates applied without overflow since the scale last changed.
    noise: with `noise_stats`, the current cycle's `core.NoiseSums` so far (zeros at a cycle
      boundary), else None.
    model_state: the model's state other than params (see `accumjax.model_state`) as of the
      last applied update, or None.
    model_acc: the current cycle's `model_state.StateAcc` so far, or None.
  """
  params: Any
  opt_state: Any
  rng: jax.Array
  update_step: jax.Array
  cycle_microbatch: jax.Array
  microbatch_step: jax.Array
  skipped_updates: jax.Array
  consecutive_skips: jax.Array
  nonfinite_microbatches: jax.Array
  cycle_first_nonfinite: jax.Array
  loss_scale: jax.Array
  loss_scale_good: jax.Array
  noise: Any = None
  model_state: Any = None
  model_acc: Any = None


def init_train_state(params, tx, rng, config: AccumConfig | None = None, *,
                     model_state=None, state_rules=None) -> TrainState:
  """Fresh state; `rng` is a key (typed or raw) or an int seed.

  Pass the `config` of a float16 run (the loss scale starts at its `initial_loss_scale`;
  without it, at 1.0) and of a run with `noise_stats` (the state then holds their sums).
  A model with state besides its params (BatchNorm statistics, counters) passes it as
  `model_state` with its `state_rules` (see `accumjax.model_state`), the same rules as to
  `make_train_step`.
  """
  if (model_state is None) != (state_rules is None):
    raise ConfigError('init_train_state needs model_state and state_rules together '
                      f'(got model_state={"None" if model_state is None else "a tree"}, '
                      f'state_rules={state_rules!r}).')
  if model_state is not None:
    model_state = jax.tree.map(jnp.array, model_state)
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  # Distinct buffers (not one shared zero, not the caller's params): the jitted step donates
  # its state, which must not delete arrays the caller still holds.
  params = jax.tree.map(jnp.copy, params)
  zero = lambda: jnp.zeros((), jnp.int32)
  scale = config.initial_loss_scale if config is not None and config.loss_scaling else 1.0
  state = TrainState(
      params, tx.init(optim.as_opt_params(params)), rng, zero(), zero(), zero(),
      skipped_updates=zero(), consecutive_skips=zero(), nonfinite_microbatches=zero(),
      cycle_first_nonfinite=jnp.full((), -1, jnp.int32),
      loss_scale=jnp.full((), scale, jnp.float32), loss_scale_good=zero(),
      noise=zero_noise() if config is not None and config.noise_stats else None,
      model_state=model_state,
      model_acc=None if model_state is None else ms.init_acc(model_state, state_rules))
  if config is not None and config.accumulator_memory == 'host':
    state = accumulator_to(state, 'host')
  return state


def accumulator_to(state: TrainState, memory: str) -> TrainState:
  """The state with the accumulator kept between calls (MultiSteps' `acc_grads`) moved to
  'host' or 'device' memory (JAX memory kinds; also inside jit). No-op in scan mode."""
  opt = state.opt_state
  if not isinstance(opt, optax.MultiStepsState):
    return state
  space = jax.memory.Space.Host if memory == 'host' else jax.memory.Space.Device
  return state._replace(opt_state=opt._replace(acc_grads=jax.device_put(opt.acc_grads, space)))


def _global_norm(tree):
  return jnp.sqrt(_sq_norm(tree))


def _after_update(state: TrainState, config: AccumConfig, done: optim.Applied, first):
  """The fault counters and loss scale, given what the optimizer did (`done`: whether this
  call completed an update, whether it was applied, the cycle's totals). Returns field
  updates."""
  updated, applied = done.updated, done.applied
  bad = done.totals.nonfinite > 0
  fault_skip = updated & ~applied & bad
  fields = dict(
      skipped_updates=state.skipped_updates + fault_skip.astype(jnp.int32),
      consecutive_skips=jnp.where(
          fault_skip, state.consecutive_skips + 1,
          jnp.where(updated, 0, state.consecutive_skips)),
      cycle_first_nonfinite=jnp.where(updated, -1, first).astype(jnp.int32))
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


def _call_sums_fn(loss_fn, config: AccumConfig, mesh, state_rules=None):
  """`(params, batch, rng_data, index_offset, n, loss_scale, model_state, state_acc) ->
  (GradSums, bad_N, call_acc)`: the core over one call's micro-batches, on one device or
  reduced over the mesh (call_acc: the call's own model-state accumulator, or None)."""
  compute_loss = with_compute_dtype(loss_fn, config.compute_jnp_dtype)
  clip_each = config.clip_norm if config.clip_before_accumulation else None
  kwargs = dict(accum_dtype=config.accum_jnp_dtype, clip_microbatch_norm=clip_each,
                noise_stats=config.noise_stats)
  devices = config.num_devices
  if mesh is not None:
    if mesh.size != devices:
      raise ConfigError(f'the mesh has {mesh.size} devices but num_devices={devices}.')
    return parallel.reduced_sums(compute_loss, mesh, config.dp_reduction, state_rules,
                                 fsdp_reduce=config.fsdp_reduce, **kwargs)
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


def _noise_metrics(totals, cycle_noise, grad_norm):
  """The update's noise statistics (NaN on an interim call, whose grad_norm is NaN)."""
  stats = noise_scale(totals._replace(noise=cycle_noise), jnp.square(grad_norm))
  return {name: jnp.where(jnp.isnan(grad_norm), jnp.nan, v) for name, v in stats.items()}


def _cycle_noise(state, sums, config: AccumConfig):
  """The cycle's noise sums including this call's (`sums`; None: the state's alone), or None
  without noise_stats."""
  if not config.noise_stats:
    return None
  if state.noise is None:
    raise ConfigError('noise_stats=True needs a state that holds the noise sums: '
                      'init_train_state(params, tx, rng, config=config).')
  return state.noise if sums is None else jax.tree.map(jnp.add, state.noise, sums.noise)


def _update_scale(config: AccumConfig, microbatches):
  """(K / base K) ** power for an update of `microbatches` micro-batches (per device), or None
  without lr batch scaling."""
  if not config.lr_power:
    return None
  ratio = jnp.asarray(microbatches, jnp.float32) / config.base_k
  return ratio if config.lr_power == 1.0 else ratio ** jnp.float32(config.lr_power)


def _metrics(state, new_state, sums, done: optim.Applied, first, last_call, cycle_noise):
  _, loss = normalize(done.totals._replace(grads=None))
  _, call_loss = normalize(sums._replace(grads=None))
  # An interim call (last_call=False) skips the norm: summing the cycle's gradient tree for a
  # number nobody reads would double the call's optimizer-side cost.
  grad_norm = jnp.full((), jnp.nan) if last_call is False else _global_norm(
      normalize(done.totals)[0])
  count = optim.schedule_count(state.opt_state)
  noise = {} if cycle_noise is None else _noise_metrics(done.totals, cycle_noise, grad_norm)
  return noise | {
      'loss': loss, 'weight': done.totals.weight,
      'call_loss': call_loss, 'call_weight': sums.weight,
      'grad_norm': grad_norm,
      'updated': done.updated, 'skipped': done.updated & ~done.applied,
      'nonfinite': done.totals.nonfinite, 'first_nonfinite': first,
      'skipped_updates': new_state.skipped_updates,
      'consecutive_skips': new_state.consecutive_skips,
      'nonfinite_microbatches': new_state.nonfinite_microbatches,
      'loss_scale': state.loss_scale,
      'schedule_count': jnp.full((), -1, jnp.int32) if count is None else count,
  }


def _model_state_fields(state: TrainState, state_rules, call_acc, done: optim.Applied):
  """The model state after this call: the cycle's accumulator grows; at the end of an update
  the rules' result is committed if the update was applied (else the cycle's starting state
  stays, like the params) and the accumulator restarts."""
  acc = ms.merge(state.model_acc, call_acc, state_rules)
  new = ms.finalize(state.model_state, acc, state_rules)
  commit = done.updated & done.applied
  model_state = jax.tree.map(lambda n, o: jnp.where(commit, n, o), new, state.model_state)
  fresh = ms.init_acc(model_state, state_rules)
  return dict(model_state=model_state,
              model_acc=jax.tree.map(lambda f, a: jnp.where(done.updated, f, a), fresh, acc))


def _check_model_state(state: TrainState, state_rules):
  if (state.model_state is None) != (state_rules is None):
    raise ConfigError(
        'the train step and the state disagree about the model state: '
        f'make_train_step(..., state_rules={state_rules!r}) but the state '
        f'{"holds none" if state.model_state is None else "holds one"} '
        '(init_train_state(..., model_state=..., state_rules=...)).')


def make_train_step(loss_fn, tx, config: AccumConfig, mesh=None, state_rules=None):
  """The train step for `config.mode`; jit it once (donating the state is safe).

  `state_rules` (with a state from `init_train_state(..., model_state=...)`): the model has
  state besides its params; `loss_fn(params, batch, rng, model_state)` returns `((loss_sum,
  weight[, aux]), new_state)` and the rules (see `accumjax.model_state`) combine the
  micro-batches' new states into the update's, in every mode and across devices.

  `mesh` (a `parallel.make_mesh()` of `config.num_devices` devices) makes the step data
  parallel: the batch is sharded along `data`, each device accumulates its own rows and the
  devices' sums meet in one `psum` per call (see parallel.py); params and optimizer state are
  replicated on a mesh `make_mesh(data=D)`, and sharded over the `fsdp` axis of a
  `make_mesh(data=D, fsdp=F)` (place the state with `parallel.place_state`; the gradient sums
  are reduce-scattered into each device's shard as `config.fsdp_reduce` says). Without a mesh
  the step runs on one device and `config.num_devices` must be 1.

  `last_call` (static; `jit_train_step` jits it so) tells whether this call
  completes its cycle, when the caller counts calls: LazyMultiSteps then compiles an interim
  program that only adds (see optim.LazyMultiSteps). None decides on device.

  The batch of a call holds `config.per_call * config.microbatch_size * config.num_devices`
  rows (the global batch; `microbatch_size` is per device). Fewer whole
  micro-batches are accepted too (the end of the data); the weights keep the math exact, and
  in multisteps/hybrid modes `make_flush` then applies a cycle cut short.

  Metrics: `loss` and `weight` are the cycle's token-weighted loss and total weight so far
  (the whole update's when `updated`); `call_loss`/`call_weight` are this call's alone;
  `grad_norm` is the norm of the cycle's mean gradient before clipping (NaN on calls passed
  `last_call=False`, where it is not computed); `skipped` marks an update not applied (zero
  total weight, or a non-finite micro-batch under 'skip_update'/'raise': params and optimizer
  state left unchanged). `nonfinite` counts the cycle's non-finite micro-batches so far and
  `first_nonfinite` is the cycle index of the first (-1: none); `skipped_updates`,
  `consecutive_skips`, `nonfinite_microbatches` are the state's counters after the call, and
  `loss_scale` the scale this call used (1.0 without float16); `schedule_count` the inner
  optimizer's count of applied updates before this call (the learning-rate schedule's step;
  -1 if the optimizer keeps none). With `config.noise_stats`: `g_sq`, `trace_sigma` and
  `b_simple`, the update's gradient noise statistics (`core.noise_scale` over all its
  micro-batches, calls and devices; NaN where `grad_norm` is, and with < 2 samples).
  """
  if state_rules is not None:
    if isinstance(state_rules, str) and state_rules not in ms.RULES:
      raise ConfigError(f'state_rules={state_rules!r}; allowed: {ms.RULES} or a pytree of them.')
  call_sums = _call_sums_fn(loss_fn, config, mesh, state_rules)
  devices = config.num_devices
  host_acc = config.accumulator_memory == 'host'

  def train_step(state: TrainState, batch, last_call: bool | None = None):
    rows = jax.tree.leaves(batch)[0].shape[0]
    b, c = config.microbatch_size, config.per_call
    if rows % (b * devices) or not 1 <= rows // (b * devices) <= c:
      raise ConfigError(
          f'a {config.mode} call takes {c} micro-batch(es) of {b} rows on each of {devices} '
          f'device(s) ({c * b * devices} rows, or fewer whole micro-batches at the end of the '
          f'data); got {rows} rows.')
    n = rows // (b * devices)
    rng_data = jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.update_step))
    loss_scale = state.loss_scale if config.loss_scaling else None
    _check_model_state(state, state_rules)
    if host_acc:
      state = accumulator_to(state, 'device')
    sums, bad_N, call_acc = call_sums(state.params, batch, rng_data, state.cycle_microbatch, n,
                                      loss_scale, state.model_state, state.model_acc)
    first = jnp.where(
        state.cycle_first_nonfinite >= 0, state.cycle_first_nonfinite,
        jnp.where(jnp.any(bad_N), state.cycle_microbatch + jnp.argmax(bad_N), -1))
    cycle_noise = _cycle_noise(state, sums, config)
    done = optim.apply_sums(tx, sums, state.opt_state, state.params, last_call,
                            _update_scale(config, state.cycle_microbatch + n))
    updated = done.updated
    if cycle_noise is not None:
      state_noise = dict(noise=jax.tree.map(lambda x: jnp.where(updated, 0.0, x), cycle_noise))
    else:
      state_noise = {}
    new_state = state._replace(
        params=done.params, opt_state=done.opt_state,
        update_step=state.update_step + updated.astype(jnp.int32),
        cycle_microbatch=jnp.where(updated, 0, state.cycle_microbatch + n),
        microbatch_step=state.microbatch_step + n,
        nonfinite_microbatches=state.nonfinite_microbatches + sums.nonfinite.astype(jnp.int32),
        **_after_update(state, config, done, first), **state_noise)
    if state_rules is not None:
      new_state = new_state._replace(**_model_state_fields(state, state_rules, call_acc, done))
    if parallel.fsdp_size(mesh) > 1:
      new_state = parallel.constrain_state(new_state, mesh)
    metrics = _metrics(state, new_state, sums, done, first, last_call, cycle_noise)
    if host_acc:
      new_state = accumulator_to(new_state, 'host')
    return new_state, metrics

  return train_step


def make_flush(tx, config: AccumConfig, state_rules=None):
  """`flush(state) -> (state, metrics)`: applies a partially accumulated cycle as one update.

  For a cycle cut short (the data ends after j < K micro-batches) in multisteps/hybrid modes;
  the update is exactly the big-batch update on those j micro-batches (and follows
  `config.nonfinite` like any update). No-op when nothing is pending and in scan mode (a scan
  call is always a whole update). Metrics: `loss`, `weight`, `updated` (false if nothing was
  pending), `skipped`, `nonfinite`; with `config.noise_stats` also the partial update's
  `g_sq`, `trace_sigma`, `b_simple` (NaN if nothing was pending). A model state (pass the
  train step's `state_rules`) is committed from the partial cycle's micro-batches.
  """

  def flush(state: TrainState):
    nan = jnp.full((), jnp.nan, jnp.float32)
    noise = {k: nan for k in ('g_sq', 'trace_sigma', 'b_simple')} if config.noise_stats else {}
    if not isinstance(state.opt_state, optax.MultiStepsState):
      zero = jnp.zeros((), jnp.float32)
      return state, noise | {'loss': zero, 'weight': zero, 'updated': jnp.zeros((), bool),
                             'skipped': jnp.zeros((), bool), 'nonfinite': zero}
    host_acc = config.accumulator_memory == 'host'
    if host_acc:
      state = accumulator_to(state, 'device')
    done = optim.flush_multisteps(tx, state.opt_state, state.params,
                                  _update_scale(config, state.cycle_microbatch))
    fields = _after_update(state, config, done, state.cycle_first_nonfinite)
    if config.noise_stats:
      cycle_noise = _cycle_noise(state, None, config)
      grad_norm = jnp.where(done.updated, _global_norm(normalize(done.totals)[0]), jnp.nan)
      noise = _noise_metrics(done.totals, cycle_noise, grad_norm)
      fields['noise'] = zero_noise()
    new_state = state._replace(
        params=done.params, opt_state=done.opt_state,
        update_step=state.update_step + done.updated.astype(jnp.int32),
        cycle_microbatch=jnp.zeros_like(state.cycle_microbatch), **fields)
    if state_rules is not None:
      _check_model_state(state, state_rules)
      empty = ms.restart(state.model_acc, state_rules)
      new_state = new_state._replace(**_model_state_fields(state, state_rules, empty, done))
    _, loss = normalize(done.totals._replace(grads=None))
    if host_acc:
      new_state = accumulator_to(new_state, 'host')
    return new_state, noise | {'loss': loss, 'weight': done.totals.weight,
                               'updated': done.updated, 'skipped': done.updated & ~done.applied,
                               'nonfinite': done.totals.nonfinite}

  return flush


def jit_train_step(train_step, *, donate: bool = True, **jit_kwargs):
  """Jits a train step with the options every train step needs, in one place: `last_call` is
  static (one program per value; see make_train_step) and the state (argument 0) is donated, so
  it is updated in place.

  With donation (and no `jit_kwargs`), `donation.jit_donating` compiles each call's program to
  take only the state leaves that the call changes (donated) or reads; leaves an interim call
  leaves untouched (params, inner optimizer state) are neither donated nor returned, because
  XLA charges a fixed cost per donated buffer on every call. The new state holds the caller's
  very arrays for those. `donate=False` keeps the input state alive, e.g. to compare states;
  `jit_kwargs` go to `jax.jit` (e.g. shardings), which then donates the whole state.
  """
  if donate and not jit_kwargs:
    return donation.jit_donating(train_step)
  return jax.jit(train_step, donate_argnums=0 if donate else (), static_argnames='last_call',
                 **jit_kwargs)
