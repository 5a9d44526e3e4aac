"""The training state, and the cycle: the update being accumulated across calls.

A `TrainState` is what a run needs to continue (a pytree of arrays, checkpointed whole). Its
`cycle` is the part an interim call changes: the gradient, loss and weight sums of the update in
progress, how many micro-batches they hold, and the non-finite and model-state bookkeeping of
that update. Everything else (params, the optimizer state, the counters) changes only on the
call that completes an update. So an interim call is a program over `(cycle, params, batch)`
that donates the cycle alone (see `step.py`), and the cycle position and the update count are
each kept once, here.

Scan mode makes one call per update: nothing is carried between calls, and `cycle` is None.

Not here: the train step (step.py), the optimizer wrappers (optim.py).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from accumjax import config as config_lib
from accumjax import model_state as ms
from accumjax.config import AccumConfig
from accumjax.core import ConfigError, GradSums, zero_sums
from accumjax.optim import accumulating_optimizer, as_opt_params, config_of, is_accumulating


class Cycle(NamedTuple):
  """The update in progress: what its calls so far have summed.

  Attributes:
    sums: the `GradSums` of the cycle's micro-batches (gradient sums in the accumulation
      dtype; with noise statistics, their `NoiseSums` too).
    microbatches: int32, micro-batches summed so far (0 at a cycle boundary): the one record of
      where the cycle stands.
    first_nonfinite: int32, index within the cycle of its first non-finite micro-batch, -1 if
      none (kept across calls and checkpoints, for the 'raise' message).
    model_acc: the cycle's `model_state.StateAcc` so far, or None (no model state).
  """
  sums: GradSums
  microbatches: jax.Array
  first_nonfinite: jax.Array
  model_acc: Any = None


class TrainState(NamedTuple):
  """Everything a run needs to continue; a pytree of arrays (checkpointable).

  Attributes:
    params: float32 params.
    opt_state: the optimizer's state (the plain optimizer's own state, or an
      `optax.MultiStepsState` under `multisteps_impl='optax'`).
    rng: base key as raw uint32 key data (checkpointable); micro-batch j of update u uses
      fold_in(fold_in(key, u), j).
    update_step: optimizer updates done (skipped updates included): the one update count.
    microbatch_step: micro-batches of the updates done (the cycle's are in `cycle`; see
      `microbatches_seen`).
    skipped_updates: updates skipped because a micro-batch was non-finite (under
      'skip_microbatch', only those where no micro-batch was left). Zero-weight skips are not
      faults and are not counted here (the `skipped` metric marks both).
    consecutive_skips: such skips in a row, up to now (0 after any completed update that
      was not one).
    nonfinite_microbatches: micro-batches of the updates done with a non-finite loss or
      gradient (the cycle's are counted in `cycle.sums.nonfinite`).
    loss_scale: float32 dynamic loss scale (float16 compute); 1.0 and unused otherwise.
    loss_scale_good: updates applied without overflow since the scale last changed.
    model_state: the model's state other than params (see `accumjax.model_state`) as of the
      last applied update, or None.
    cycle: the update in progress (`Cycle`), or None in scan mode (one call per update).
  """
  params: Any
  opt_state: Any
  rng: jax.Array
  update_step: jax.Array
  microbatch_step: jax.Array
  skipped_updates: jax.Array
  consecutive_skips: jax.Array
  nonfinite_microbatches: jax.Array
  loss_scale: jax.Array
  loss_scale_good: jax.Array
  model_state: Any = None
  cycle: Cycle | None = None


def cycle_microbatches(state: TrainState) -> int:
  """Micro-batches summed into the state's unfinished update (one device read; 0 without a
  cycle)."""
  return 0 if state.cycle is None else int(state.cycle.microbatches)


def microbatches_seen(state: TrainState) -> int:
  """Micro-batches processed since the start, mid-cycle ones included (strictly increasing
  over calls: the checkpoint step)."""
  return int(state.microbatch_step) + cycle_microbatches(state)


def empty_cycle(params, config: AccumConfig, model_state=None, state_rules=None) -> Cycle:
  """A cycle with nothing summed yet (new buffers), for `config`'s accumulation dtype and noise
  statistics."""
  return Cycle(
      sums=zero_sums(params, config.accum_jnp_dtype, config.noise_stats),
      microbatches=jnp.zeros((), jnp.int32),
      first_nonfinite=jnp.full((), -1, jnp.int32),
      model_acc=None if model_state is None else ms.init_acc(model_state, state_rules))


def needs_cycle(config: AccumConfig) -> bool:
  """Whether the state carries a cycle between calls (several calls per update)."""
  return config.calls_per_update > 1


def init_train_state(params, optimizer, rng, config: AccumConfig | None = None, *,
                     model_state=None, state_rules=None) -> TrainState:
  """Fresh state; `rng` is a key (typed or raw) or an int seed.

  `optimizer` is the plain optax optimizer you pass to `make_train_step` (or the result of
  `accumulating_optimizer(optimizer, config)`, whose config is then the default). Pass the
  `config`: it says whether the state carries a cycle between calls, the accumulation dtype,
  noise statistics, clipping and the float16 loss scale's start. Without any, the state has no
  cycle and no clipping in its optimizer state; the train step adds a cycle on its first call
  when its config needs one. A model with state
  besides its params (BatchNorm statistics, counters) passes it as `model_state` with its
  `state_rules` (see `accumjax.model_state`), the same rules as to `make_train_step`.
  """
  if (model_state is None) != (state_rules is None):
    raise ConfigError('init_train_state needs model_state and state_rules together '
                      f'(got model_state={"None" if model_state is None else "a tree"}, '
                      f'state_rules={state_rules!r}).')
  if model_state is not None:
    ms.expand_rules(model_state, state_rules)
    model_state = jax.tree.map(jnp.array, model_state)
  if isinstance(rng, int) and not isinstance(rng, bool):
    rng = jax.random.key(rng)
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  if rng.dtype != jnp.uint32 or rng.ndim != 1:
    raise ConfigError(f'rng of dtype {rng.dtype} and shape {rng.shape}; allowed: an int seed, '
                      'a jax.random.key or its raw uint32 key data.')
  # Distinct buffers (not one shared zero, not the caller's params): the jitted step donates
  # its state, which must not delete arrays the caller still holds.
  params = jax.tree.map(jnp.copy, params)
  if config is None:
    config = config_of(optimizer) if is_accumulating(optimizer) else None
  tx = accumulating_optimizer(optimizer, config)
  zero = lambda: jnp.zeros((), jnp.int32)
  scale = config.initial_loss_scale if config is not None and config.loss_scaling else 1.0
  cycle = None
  if config is not None and needs_cycle(config):
    cycle = empty_cycle(params, config, model_state, state_rules)
  state = TrainState(
      params, tx.init(as_opt_params(params)), rng, update_step=zero(), microbatch_step=zero(),
      skipped_updates=zero(), consecutive_skips=zero(), nonfinite_microbatches=zero(),
      loss_scale=jnp.full((), scale, jnp.float32), loss_scale_good=zero(),
      model_state=model_state, cycle=cycle)
  if config is not None and config.accumulator_memory == 'host':
    state = accumulator_to(state, 'host')
  return state


def accumulator_to(state, memory: str):
  """The state (or a `Cycle`) with the cycle's gradient sums moved to 'host' or 'device' memory
  (JAX memory kinds; also inside jit). No-op without a cycle."""
  cycle = state if isinstance(state, Cycle) else state.cycle
  if cycle is None:
    return state
  space = jax.memory.Space.Host if memory == 'host' else jax.memory.Space.Device
  moved = cycle._replace(sums=cycle.sums._replace(grads=jax.device_put(cycle.sums.grads, space)))
  return moved if isinstance(state, Cycle) else state._replace(cycle=moved)


def state_bytes_per_device(state, config=None) -> dict:
  """Bytes one device holds of a (placed or abstract) TrainState: params, optimizer state and
  the accumulator kept in it between calls (the cycle's sums in multisteps/hybrid; under
  `multisteps_impl='optax'` also optax.MultiSteps' own, inside the optimizer state; 0 in scan
  mode). With the `AccumConfig`, also `call_accumulator`: the gradient sums carried through a
  call's micro-batch scan (full size, or a shard under fsdp_reduce='microbatch')."""

  def nbytes(tree, shard=True):
    total = 0
    for x in jax.tree.leaves(tree):
      sharding = getattr(x, 'sharding', None)
      shape = sharding.shard_shape(x.shape) if shard and sharding is not None else np.shape(x)
      total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total

  out = {'params': nbytes(state.params), 'opt_state': nbytes(state.opt_state),
         'accumulator': nbytes(state.cycle)}
  if config is not None:
    ratio = config.accum_jnp_dtype.itemsize / 4  # float32 params
    mine = config.fsdp_reduce == 'microbatch' or config.fsdp_gather == 'layer'
    out['call_accumulator'] = int(nbytes(state.params, shard=mine) * ratio)
  return out


def _nbytes(tree, dtype=None) -> int:
  """Bytes of the whole arrays of `tree` (in `dtype` if given, floats only)."""
  size = lambda x: np.dtype(dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)
                            else x.dtype).itemsize
  return sum(int(np.prod(np.shape(x), dtype=np.int64)) * size(x) for x in jax.tree.leaves(tree))


def live_bytes_per_device(state, config: AccumConfig, fsdp: int = 1, stacked=None,
                          activation_bytes: int = 0, layer_bytes: int = 0) -> dict:
  """What one device holds at the peak of a call, part by part, and their `total`: an account
  to print beside XLA's memory analysis (experiments/scale.py compares them).

  - `params`, `opt_state`, `accumulator`: the state's shards (`state_bytes_per_device`);
  - `call_accumulator`: the micro-batch scan's gradient carry (full size, or a shard under
    fsdp_reduce='microbatch' or fsdp_gather='layer');
  - `gathered_params`: the params in the compute dtype as the forward pass reads them: all of
    them under the 'call' gather (and on a replicated mesh, the compute-dtype copy if it is
    not float32), under 'layer' the unstacked ones plus two layers (one being used, the next
    arriving);
  - `microbatch_gradient`: one micro-batch's gradient before it is added (full size under
    'call'; under 'layer' a shard, plus one whole layer's and the unstacked leaves' while they
    are reduce-scattered);
  - `update`: one gradient shard more while the optimizer runs;
  - `activations`: `activation_bytes`, what the backward pass keeps from the forward pass (the
    caller's estimate, e.g. `layers.saved_activation_bytes` of one device's micro-batch);
  - `layer_working`: half of `layer_bytes` (one layer's intermediates without remat): what the
    backward pass of the layer being differentiated holds at once (recomputed ones, and the
    cotangents). One half is a measured fit: at 85M in float32 on CPU it put the total within
    8% of XLA's under each remat policy.

  `stacked`: the pytree of the model's layer-stacked params (leading layer axis), needed for
  the 'layer' gather; `fsdp`: the mesh's fsdp size.
  """
  parts = state_bytes_per_device(state, config)
  compute, accum = config.compute_jnp_dtype, config.accum_jnp_dtype
  full = _nbytes(state.params, accum)
  shard = full // fsdp
  layer_gather = fsdp > 1 and config.fsdp_gather == 'layer'
  if layer_gather:
    if stacked is None:
      raise ConfigError("live_bytes_per_device: fsdp_gather='layer' needs stacked= (the "
                        "model's layer-stacked params).")
    layers = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}.pop()
    stacked_full, stacked_compute = _nbytes(stacked, accum), _nbytes(stacked, compute)
    rest_compute = _nbytes(state.params, compute) - stacked_compute
    parts['call_accumulator'] = shard
    parts['gathered_params'] = rest_compute + 2 * stacked_compute // layers
    parts['microbatch_gradient'] = shard + (full - stacked_full) + stacked_full // layers
  else:
    copy = fsdp > 1 or compute != jnp.dtype(jnp.float32)
    parts['gathered_params'] = _nbytes(state.params, compute) if copy else 0
    parts['microbatch_gradient'] = full
  parts['update'] = shard
  parts['activations'] = int(activation_bytes)
  parts['layer_working'] = int(layer_bytes) // 2
  parts['total'] = sum(parts.values())
  return parts


def describe(config: AccumConfig, state=None, **live) -> dict:
  """A plain dict of the accumulation setup (`config.describe`), for banners, config.json and
  metrics. With the (placed or abstract) train `state`, also the bytes one device holds of it:
  `{params,opt_state,accumulator,call_accumulator}_bytes_per_device` (see
  `state_bytes_per_device`; sharded over fsdp, they shrink with F). With `live` (the keyword
  arguments of `live_bytes_per_device`: fsdp, stacked, activation_bytes, layer_bytes), also
  `live_bytes_per_device`: the whole live set of a call, part by part."""
  out = config_lib.describe(config)
  if state is not None:
    out.update({f'{name}_bytes_per_device': n
                for name, n in state_bytes_per_device(state, config).items()})
    if live:
      out['live_bytes_per_device'] = live_bytes_per_device(state, config, **live)
  return out
