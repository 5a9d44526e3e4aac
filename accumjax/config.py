"""The accumulation setup as one small validated dataclass, and `describe` for logging."""

import dataclasses
import math

import jax
import jax.numpy as jnp

from accumjax import settings
from accumjax.errors import ConfigError, check_bool, check_int
from accumjax.settings import finite_number, setting

MODES = ('scan', 'multisteps', 'hybrid')
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
# What an update containing a micro-batch with a NaN or Inf loss or gradient does (see optim.py).
NONFINITE_POLICIES = ('skip_update', 'skip_microbatch', 'raise')
DP_REDUCTIONS = ('psum', 'ordered')
# Where an FSDP step reduce-scatters gradients into each device's shard (see parallel.py).
FSDP_REDUCES = ('call', 'microbatch')
# When an FSDP step gathers the params: once per call, or one layer at a time (parallel.py).
FSDP_GATHERS = ('call', 'layer')
# Where the accumulator kept between calls lives (multisteps/hybrid): JAX memory kinds.
ACCUMULATOR_MEMORIES = ('device', 'host')
MULTISTEPS_IMPLS = ('lazy', 'optax')
# The command line's words for the compute dtypes (--precision).
PRECISION_WORDS = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}
# What a resumed LM run may do with a setting (accumjax/settings.py: `on_resume`).
HARMLESS, ACCUMULATION = 'harmless', 'accumulation'
ACCUM_DTYPES = ('float32', 'float64')
# How the learning rate follows the effective batch when K changes between updates: the update
# is multiplied by (K / base K) ** power (Goyal et al. 2017: linear, for SGD; Malladi et al.
# 2022: square root, for Adam).
LR_BATCH_SCALING = {'none': 0.0, 'linear': 1.0, 'sqrt': 0.5}


def _number(name, value, allowed: str, ok, optional=False):
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
      value) or not ok(value):
    raise ConfigError(f'{name}={value!r} must be a finite number {allowed}.')


@dataclasses.dataclass(frozen=True)
class AccumConfig:
  """How one optimizer update is assembled from micro-batches.

  Attributes:
    num_microbatches: K, micro-batches per optimizer update.
    microbatch_size: rows per micro-batch (per device).
    mode: 'scan' (one call per update, scanning K micro-batches), 'multisteps' (one call per
      micro-batch, optax.MultiSteps holds the sums between calls) or 'hybrid' (each call scans
      `microbatches_per_call` micro-batches, MultiSteps holds the sums over K / c calls).
    microbatches_per_call: c, for 'hybrid' (must divide K; default None: K/2 for an even K,
      else 1); implied by the other modes.
    compute_dtype: forward/backward dtype. Params, optimizer state, accumulators and the loss
      stay float32 whatever it is. 'float16' turns on dynamic loss scaling (float16's range
      is too small for many gradients); bfloat16 has float32's range and needs none.
    accum_dtype: dtype of the gradient sums.
    clip_norm: global-norm clip (None for none).
    clip_before_accumulation: False (default) clips the accumulated mean gradient, exactly as
      the big batch would be clipped; True clips each micro-batch's mean gradient before it is
      added (a different, per-micro-batch estimator, as in per-example clipping).
    seq_len: tokens per example, if the batch is a sequence batch (for tokens per update).
    num_devices: data-parallel size (devices of the `data` mesh; see parallel.py).
    dp_reduction: how the devices' sums meet, once per call: 'psum' (default; one all-reduce)
      or 'ordered' (all-gather, then a sum in device order: bitwise the same result however
      the devices are spread over processes, at num_devices x the gradient memory).
    fsdp_reduce: on a mesh with an `fsdp` axis (sharded params, optimizer state and
      accumulator; see parallel.py), where each device's micro-batch gradients are
      reduce-scattered into its shard of the sums: 'call' (default; once per call after the
      scan, whose accumulator is full size) or 'microbatch' (after every micro-batch, so the
      scan's accumulator is only a shard; one collective per micro-batch). Same math.
      Under fsdp_gather='layer' it does not apply (each layer's gradient is reduce-scattered
      as the backward pass produces it).
    fsdp_gather: on a mesh with an `fsdp` axis, when the params are gathered: 'call'
      (default; once per call, before the micro-batch scan: the full params live for the
      call) or 'layer' (JAX's partitioner gathers one layer at a time inside a model that
      scans its layers with `layers.scan_layers`, again in the backward pass; a micro-batch is
      then the fsdp group's rows). Same math for the update; see parallel.reduced_sums.
    accumulator_memory: 'device' (default) or 'host': in multisteps/hybrid mode, the float32
      gradient sums kept in the state between calls live in the devices' memory, or in host
      memory (JAX's `pinned_host` memory kind; each call moves them to the device and back).
      Same math. On a CPU backend both are the same RAM, so 'host' only adds two copies per
      call; on a GPU it frees the accumulator's device memory between calls.
    multisteps_impl: 'lazy' (default; `optim.LazyMultiSteps`: optax.MultiSteps' state and
      results, but interim calls only add) or 'optax' (`optax.MultiSteps` as shipped, which
      runs the optimizer on every call). Same state; results equal to float32 rounding.
    nonfinite: what an update with a non-finite micro-batch does. 'skip_update' (default):
      no update at all, params and optimizer state unchanged, the cycle stays aligned with the
      data. 'skip_microbatch': the bad micro-batches are left out and the update is the
      big-batch update of the rest (renormalised by their weight). 'raise': on device like
      skip_update; the training loop then stops, naming the update and micro-batch.
    initial_loss_scale: float16 only: the dynamic loss scale to start from.
    loss_scale_growth_interval: float16 only: the scale doubles after this many applied
      updates in a row without overflow; an overflow halves it (once per update).
    lr_batch_scaling: 'none' (default), 'linear' or 'sqrt': when an update holds K micro-batches
      (K may change between updates: `run_update(num_microbatches=...)`), its parameter update
      is multiplied by (K / base_num_microbatches) ** 1 or ** 0.5, i.e. the learning rate (and
      AdamW's decoupled decay, which is applied with it) follows the effective batch. Computed
      on device from the micro-batches the update really had.
    base_num_microbatches: the K at which the optimizer's learning rate is the one given
      (default: num_microbatches).
    noise_stats: the train step also estimates the gradient noise scale of every update from
      its micro-batches (metrics `g_sq`, `trace_sigma`, `b_simple`; see core.noise_scale).
      Needs at least 2 micro-batches per update (over all devices).
  """
  # Each setting a run chooses is declared once, here (accumjax/settings.py): its flag, help and
  # choices make `python -m experiments.train`'s command line; the rest are derived by the
  # LM trainer (K, devices, noise) or have no flag.
  CHECKED_AT_INIT = True

  num_microbatches: int
  microbatch_size: int = setting(
      dataclasses.MISSING, 'micro-batch size (sequences per micro-batch, per device)',
      group='accumulation', flag='--batch-size', flat='batch_size', minimum=1,
      on_resume=ACCUMULATION)
  mode: str = setting(
      'scan', 'scan: one call per update; multisteps: one call per micro-batch; hybrid: c '
      'micro-batches per call', group='accumulation', flag='--accum-mode', flat='accum_mode',
      choices=MODES, on_resume=ACCUMULATION)
  microbatches_per_call: int | None = setting(
      None, 'c for hybrid mode (default K/2 for even K, else 1)', group='accumulation',
      minimum=1, on_resume=ACCUMULATION, parse=int)
  compute_dtype: str = setting(
      'float32', 'compute precision; params and accumulation stay float32. fp16 uses dynamic '
      'loss scaling; bf16 needs none (float32 exponent range)', group='accumulation',
      flag='--precision', flat='precision', choices=COMPUTE_DTYPES, words=PRECISION_WORDS)
  accum_dtype: str = 'float32'
  clip_norm: float | None = setting(
      None, 'global-norm clip of the accumulated mean gradient; 0 disables',
      group='optimization', parse=lambda text: float(text) or None,
      check=(finite_number(lambda v: v > 0), 'must be a positive finite number (or None: no '
             'clipping; 0 on the command line).'))
  clip_before_accumulation: bool = setting(
      False, 'clip each micro-batch mean gradient instead (a different estimator)',
      group='optimization')
  seq_len: int | None = setting(None, 'tokens per example', group='data', minimum=1, parse=int)
  num_devices: int = 1
  multisteps_impl: str = setting(
      'lazy', "lazy: the train step's own cycle, the optimizer runs once per update; optax: "
      'optax.MultiSteps as shipped, the optimizer runs on every call (same results)',
      group='accumulation', choices=MULTISTEPS_IMPLS, on_resume=HARMLESS)
  nonfinite: str = setting(
      'skip_update', 'skip_update: skip the whole update (params and optimizer state '
      'unchanged, cycle stays aligned); skip_microbatch: drop the bad micro-batches, '
      'renormalise by the remaining weight; raise: stop (exit 1) naming the update and '
      'micro-batch', group='nonfinite', flag='--nonfinite-policy', flat='nonfinite_policy',
      choices=NONFINITE_POLICIES, on_resume=HARMLESS)
  initial_loss_scale: float = 2.0 ** 15
  loss_scale_growth_interval: int = 200
  dp_reduction: str = setting(
      'psum', "how devices' gradient sums meet, once per call: psum (one all-reduce) or "
      'ordered (all-gather + sum in device order: bitwise the same on any process layout, N x '
      'gradient memory)', group='parallel', choices=DP_REDUCTIONS, on_resume=ACCUMULATION)
  fsdp_reduce: str = setting(
      'call', "with fsdp: reduce-scatter the gradients into each device's shard once per call "
      '(full-size accumulator inside the call, one collective) or after every micro-batch '
      '(accumulator a shard, one collective each)', group='parallel', choices=FSDP_REDUCES,
      on_resume=HARMLESS)
  fsdp_gather: str = setting(
      'call', 'with fsdp: gather the params once per call (call: full params live for the '
      'call, fewest collectives) or one layer at a time inside the layer scan, forward and '
      'backward, each layer\'s gradient reduce-scattered as produced (layer: no full-size param '
      'or gradient buffer; --fsdp-reduce does not apply)', group='parallel',
      choices=FSDP_GATHERS, on_resume=HARMLESS)
  accumulator_memory: str = setting(
      'device', 'multisteps/hybrid: keep the float32 gradient sums between calls in device or '
      'host memory (pinned_host; moved in and out every call). On a CPU backend both are the '
      'same RAM', group='parallel', choices=ACCUMULATOR_MEMORIES, on_resume=HARMLESS)
  noise_stats: bool = False
  lr_batch_scaling: str = setting(
      'none', 'when K changes (schedule, auto), scale the learning rate by (K / first K) ** 1 '
      '(linear, SGD) or ** 0.5 (sqrt, Adam)', group='accumulation',
      choices=tuple(LR_BATCH_SCALING))
  base_num_microbatches: int | None = None

  def __post_init__(self):
    # Every field is type- and range-checked: a truthy string for a bool, a float for an int
    # or a string for a number would otherwise pass silently or fail deep inside JAX. The
    # declared settings from their declarations, the others here.
    check_int('num_microbatches', self.num_microbatches)
    k = self.num_microbatches
    settings.check(self, as_argument=True)
    check_int('num_devices', self.num_devices)
    check_int('loss_scale_growth_interval', self.loss_scale_growth_interval)
    check_int('base_num_microbatches', self.base_num_microbatches, optional=True)
    if self.accum_dtype not in ACCUM_DTYPES:
      raise ConfigError(f'accum_dtype={self.accum_dtype!r}; allowed: {", ".join(ACCUM_DTYPES)}.')
    if self.accum_dtype == 'float64' and not jax.config.jax_enable_x64:
      raise ConfigError("accum_dtype='float64' needs 64-bit JAX (jax.config.update("
                        "'jax_enable_x64', True) before anything else); without it JAX would "
                        'accumulate in float32.')
    check_bool('noise_stats', self.noise_stats)
    if self.noise_stats and k * self.num_devices < 2:
      raise ConfigError(
          f'noise_stats=True needs >= 2 micro-batches per update; got num_microbatches={k} on '
          f'{self.num_devices} device(s): one micro-batch is no small-batch sample to compare '
          'the big batch with.')
    _number('initial_loss_scale', self.initial_loss_scale, 'in [1, 2**24]',
            lambda v: 1.0 <= v <= 2.0 ** 24)
    c = self.microbatches_per_call
    if self.mode == 'hybrid':
      if c is not None and k % c:
        divisors = [d for d in range(1, k + 1) if k % d == 0]
        raise ConfigError(
            f'hybrid mode needs microbatches_per_call (c) dividing num_microbatches={k}; '
            f'got c={c!r}, allowed: {divisors}.')
    elif c is not None and c != self.implied_per_call():
      raise ConfigError(
          f'microbatches_per_call={c!r} conflicts with mode={self.mode!r} '
          f'(which uses {self.implied_per_call()}); use mode="hybrid" to choose c.')
    if self.accumulator_memory == 'host' and self.calls_per_update == 1:
      raise ConfigError(
          f"accumulator_memory='host' keeps the sums between the calls of an update, but "
          f'{self.mode} mode with K={k} makes one call per update (its sums live only inside '
          "the call); use mode='multisteps' or 'hybrid', or accumulator_memory='device'.")
    if self.clip_before_accumulation and self.clip_norm is None:
      raise ConfigError('clip_before_accumulation=True needs a clip_norm.')

  def implied_per_call(self) -> int:
    k = self.num_microbatches
    hybrid = self.microbatches_per_call or (k // 2 if k % 2 == 0 else 1)
    return {'scan': k, 'multisteps': 1}.get(self.mode, hybrid)

  @property
  def masks_microbatches(self) -> bool:
    """Whether each micro-batch's gradient is checked and masked on its own: for
    'skip_microbatch' (the update is the rest's) and 'raise' (which names the micro-batch),
    under float16 loss scaling (an overflow names its micro-batch) and under optax.MultiSteps
    (which decides per call). Otherwise ('skip_update') one check
    of the update's gradient sum decides (core.count_nonfinite_sum)."""
    return self.nonfinite != 'skip_update' or self.loss_scaling or (
        self.calls_per_update > 1 and self.multisteps_impl == 'optax')

  @property
  def per_call(self) -> int:
    """c: micro-batches scanned in one jitted call."""
    return self.implied_per_call()

  @property
  def calls_per_update(self) -> int:
    return self.num_microbatches // self.per_call

  @property
  def effective_batch(self) -> int:
    return self.microbatch_size * self.num_microbatches * self.num_devices

  @property
  def lr_power(self) -> float:
    """The exponent of K / base K in the update's multiplier (0: no scaling)."""
    return LR_BATCH_SCALING[self.lr_batch_scaling]

  @property
  def base_k(self) -> int:
    return self.base_num_microbatches or self.num_microbatches

  @property
  def loss_scaling(self) -> bool:
    """Dynamic loss scaling: on exactly for float16 compute."""
    return self.compute_dtype == 'float16'

  @property
  def compute_jnp_dtype(self):
    return jnp.dtype(self.compute_dtype)

  @property
  def accum_jnp_dtype(self):
    return jnp.dtype(self.accum_dtype)


def describe(config: AccumConfig) -> dict:
  """A plain dict of the accumulation setup, for banners, config.json and metrics (with the
  state's bytes per device: `accumjax.describe(config, state)`)."""
  tokens = None if config.seq_len is None else config.effective_batch * config.seq_len
  if config.clip_norm is None:
    clipping = 'none'
  elif config.clip_before_accumulation:
    clipping = f'each micro-batch mean gradient to {config.clip_norm}'
  else:
    clipping = f'accumulated mean gradient to {config.clip_norm}'
  out = {
      'mode': config.mode,
      'microbatch_size': config.microbatch_size,
      'num_microbatches': config.num_microbatches,
      'microbatches_per_call': config.per_call,
      'calls_per_update': config.calls_per_update,
      'num_devices': config.num_devices,
      'effective_batch': config.effective_batch,
      'seq_len': config.seq_len,
      'tokens_per_update': tokens,
      'compute_dtype': config.compute_dtype,
      'accum_dtype': config.accum_dtype,
      'param_dtype': 'float32',
      'clipping': clipping,
      'multisteps_impl': config.multisteps_impl if config.calls_per_update > 1 else None,
      'nonfinite': config.nonfinite,
      'loss_scaling': (f'dynamic, from {config.initial_loss_scale:g}, x2 after '
                       f'{config.loss_scale_growth_interval} good updates, /2 on overflow'
                       if config.loss_scaling else 'none'),
      'dp_reduction': config.dp_reduction if config.num_devices > 1 else None,
      'fsdp_reduce': config.fsdp_reduce,
      'fsdp_gather': config.fsdp_gather,
      'accumulator_memory': config.accumulator_memory,
      'reductions_per_update': config.calls_per_update if config.num_devices > 1 else 0,
      'noise_stats': config.noise_stats,
      'lr_batch_scaling': (f'{config.lr_batch_scaling} (x (K / {config.base_k}) ** '
                           f'{config.lr_power:g})' if config.lr_power else 'none'),
  }
  return out
