"""The settings of a training run (`TrainConfig`) and what is built from them.

Validation with clear errors, the optimizer and schedule, the model config, the loss, and the
memory planner's resolution of --memory-budget. Used by `train.py`, `resume.py` and the
experiments; no training loop here.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from accumjax import data as data_lib
from accumjax.config import NONFINITE_POLICIES, AccumConfig
from accumjax.core import ConfigError
from accumjax.losses import token_cross_entropy
from accumjax.model import ModelConfig, make_lm
from accumjax.optim import accumulating_optimizer
from accumjax.planner import Plan, compiled_memory, parse_bytes, plan_microbatch
from accumjax.step import init_train_state, make_train_step

PRECISIONS = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}
# What may change when a run is resumed. Settings that only change what is logged or saved,
# and the fault policy (it changes nothing while values are finite; a run stopped by 'raise'
# is meant to be resumed with 'skip_update'):
HARMLESS = ('eval_every', 'eval_batches', 'log_every', 'log_microbatches', 'save_every',
            'save_every_micro', 'keep', 'steps', 'multisteps_impl', 'memory_budget',
            'nonfinite_policy', 'max_consecutive_skips')
# The shape of an update: safe to change between cycles, never inside one without a policy.
# (`mesh` and `dp_reduction` too: the device count is compared as resolved, see resume.py.)
ACCUMULATION = ('batch_size', 'grad_accum_steps', 'tokens_per_update', 'accum_mode',
                'microbatches_per_call', 'mesh', 'dp_reduction')
ON_CONFIG_CHANGE = ('refuse', 'flush')
OPTIMIZERS = ('adamw', 'sgd', 'lion')
SCHEDULES = ('cosine', 'constant')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of a run; `experiments.train --help` documents each flag."""
  # data
  data: str | None = None
  seq_len: int = 128
  pack: bool = False
  # accumulation
  batch_size: int = 8
  grad_accum_steps: int | None = None
  tokens_per_update: int | None = None
  accum_mode: str = 'scan'
  microbatches_per_call: int | None = None
  multisteps_impl: str = 'lazy'
  memory_budget: str | None = None
  precision: str = 'fp32'
  # non-finite values
  nonfinite_policy: str = 'skip_update'
  max_consecutive_skips: int = 10
  inject_faults: str | None = None
  # data parallelism: 'data=N' or None (all devices); how the devices' sums meet
  mesh: str | None = None
  dp_reduction: str = 'psum'
  # optimization
  optimizer: str = 'adamw'
  lr: float = 3e-3
  weight_decay: float = 0.1
  warmup_steps: int = 20
  schedule: str = 'cosine'
  clip_norm: float | None = 1.0
  clip_before_accumulation: bool = False
  steps: int = 300
  # model
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  max_len: int = 256
  positions: str = 'rope'
  dropout: float = 0.0
  # run
  seed: int = 0
  eval_every: int = 50
  eval_batches: int = 8
  log_every: int = 10
  log_microbatches: bool = False
  # checkpoints (0 disables)
  save_every: int = 100
  save_every_micro: int = 0
  keep: int = 3

  def num_microbatches(self, num_devices: int = 1) -> int:
    """K, from --grad-accum-steps or --tokens-per-update (default 4)."""
    if self.tokens_per_update is None:
      return 4 if self.grad_accum_steps is None else self.grad_accum_steps
    per_mb = self.batch_size * self.seq_len * num_devices
    if self.tokens_per_update <= 0 or self.tokens_per_update % per_mb:
      raise ConfigError(
          f'--tokens-per-update {self.tokens_per_update} is not a positive multiple of '
          f'batch size x seq len x devices = {self.batch_size} x {self.seq_len} x {num_devices} '
          f'= {per_mb}; allowed: {per_mb}, {2 * per_mb}, {4 * per_mb}, ...')
    return self.tokens_per_update // per_mb


def _positive_int(name, value, minimum=1):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f'--{name.replace("_", "-")} {value!r} must be an integer >= {minimum}.')


def validate(cfg: TrainConfig, num_devices: int = 1) -> AccumConfig:
  """Checks every setting; returns the AccumConfig. Raises ConfigError before any work."""
  if cfg.grad_accum_steps is not None and cfg.tokens_per_update is not None:
    raise ConfigError('give --grad-accum-steps or --tokens-per-update, not both.')
  for name in ('batch_size', 'seq_len', 'steps', 'eval_every', 'eval_batches', 'log_every',
               'd_model', 'num_layers', 'num_heads', 'mlp_ratio', 'max_len', 'keep'):
    _positive_int(name, getattr(cfg, name))
  for name in ('warmup_steps', 'save_every', 'save_every_micro', 'max_consecutive_skips'):
    _positive_int(name, getattr(cfg, name), minimum=0)
  if cfg.grad_accum_steps is not None:
    _positive_int('grad_accum_steps', cfg.grad_accum_steps)
  if cfg.seq_len > cfg.max_len:
    raise ConfigError(
        f'--seq-len {cfg.seq_len} is longer than the model allows (--max-len {cfg.max_len}).')
  if cfg.d_model % cfg.num_heads or (cfg.d_model // cfg.num_heads) % 2:
    raise ConfigError(f'--d-model {cfg.d_model} must split into --heads {cfg.num_heads} '
                      'heads of even size.')
  if not (math.isfinite(cfg.lr) and cfg.lr > 0):
    raise ConfigError(f'--lr {cfg.lr} must be a positive finite number.')
  if not cfg.weight_decay >= 0:
    raise ConfigError(f'--weight-decay {cfg.weight_decay} must be >= 0.')
  if not 0.0 <= cfg.dropout < 1.0:
    raise ConfigError(f'--dropout {cfg.dropout} must be in [0, 1).')
  choices = {'precision': tuple(PRECISIONS), 'optimizer': OPTIMIZERS, 'schedule': SCHEDULES,
             'positions': ('rope', 'learned'), 'nonfinite_policy': NONFINITE_POLICIES}
  for name, allowed in choices.items():
    if getattr(cfg, name) not in allowed:
      raise ConfigError(f'--{name} {getattr(cfg, name)!r}; allowed: {", ".join(allowed)}.')
  if cfg.clip_norm is not None and not cfg.clip_norm > 0:
    raise ConfigError(f'--clip-norm {cfg.clip_norm} must be > 0 (0 or omitted: see --help).')
  k = cfg.num_microbatches(num_devices)
  parse_faults(cfg.inject_faults, k)
  per_call = cfg.microbatches_per_call
  if cfg.accum_mode == 'hybrid' and per_call is None:
    per_call = k // 2 if k % 2 == 0 else 1
  return AccumConfig(
      num_microbatches=k, microbatch_size=cfg.batch_size, mode=cfg.accum_mode,
      microbatches_per_call=per_call, compute_dtype=PRECISIONS[cfg.precision],
      clip_norm=cfg.clip_norm, clip_before_accumulation=cfg.clip_before_accumulation,
      seq_len=cfg.seq_len, num_devices=num_devices, multisteps_impl=cfg.multisteps_impl,
      nonfinite=cfg.nonfinite_policy, dp_reduction=cfg.dp_reduction)


def parse_faults(spec: str | None, num_microbatches: int) -> dict[tuple[int, int], float]:
  """--inject-faults 'U:J[:V],...' -> {(update U, micro-batch J): V}, for fault drills.

  U counts updates from 1 (as the log does), J micro-batches of the cycle from 0 (as the
  'raise' message does). V (default nan) multiplies that micro-batch's loss sum: nan, inf,
  -inf, or a finite factor (a large one, e.g. 1e6, overflows float16 only once scaled).
  """
  if spec is None:
    return {}
  faults = {}
  for item in spec.split(','):
    parts = item.strip().split(':')
    try:
      if len(parts) not in (2, 3):
        raise ValueError
      u, j = int(parts[0]), int(parts[1])
      v = float(parts[2]) if len(parts) == 3 else float('nan')
    except ValueError:
      raise ConfigError(
          f'--inject-faults {spec!r}: {item!r} is not UPDATE:MICROBATCH[:VALUE] '
          '(e.g. 3:1:nan, 5:0:inf, 7:2:1e6).') from None
    if u < 1 or not 0 <= j < num_microbatches:
      raise ConfigError(
          f'--inject-faults {spec!r}: {item!r} needs UPDATE >= 1 and 0 <= MICROBATCH < '
          f'{num_microbatches} (K).')
    faults[(u, j)] = v
  return faults


def fault_rows(faults: dict, update: int, first_microbatch: int, num_microbatches: int,
               microbatch_size: int) -> np.ndarray:
  """The per-row `fault` factors of one call (1.0 except the injected micro-batches)."""
  rows = np.ones((num_microbatches, microbatch_size), np.float32)
  for i in range(num_microbatches):
    rows[i] = faults.get((update, first_microbatch + i), 1.0)
  return rows.reshape(-1)


def lr_schedule(cfg: TrainConfig):
  if cfg.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
        [cfg.warmup_steps]) if cfg.warmup_steps else optax.constant_schedule(cfg.lr)
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1), cfg.lr * 0.1)


def inner_optimizer(cfg: TrainConfig, schedule):
  if cfg.optimizer == 'adamw':
    return optax.adamw(schedule, b2=0.95, weight_decay=cfg.weight_decay)
  if cfg.optimizer == 'lion':
    return optax.lion(schedule, weight_decay=cfg.weight_decay)
  return optax.sgd(schedule, momentum=0.9)


def model_config(cfg: TrainConfig) -> ModelConfig:
  return ModelConfig(
      vocab_size=data_lib.VOCAB_SIZE, d_model=cfg.d_model, num_layers=cfg.num_layers,
      num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, max_len=cfg.max_len,
      positions=cfg.positions, dropout=cfg.dropout)


def make_loss_fn(apply):
  def loss_fn(params, batch, rng):
    logits = apply(params, batch['inputs'], rng)
    loss_sum, weight = token_cross_entropy(logits, batch['targets'], batch['mask'])
    if 'fault' in batch:  # --inject-faults drills: the micro-batch's rows carry the factor
      loss_sum = loss_sum * jnp.mean(batch['fault'])
    return loss_sum, weight
  return loss_fn


def plan_for_budget(cfg: TrainConfig, num_devices: int = 1) -> tuple[TrainConfig, Plan]:
  """Resolves --memory-budget: the largest micro-batch whose compiled train step fits, and the
  K that reaches --tokens-per-update. Returns the config with batch_size and K set.

  With `num_devices` data-parallel devices the budget is per device: each device runs the
  one-device program on its share of the rows (plus one reduction per call).
  """
  if cfg.tokens_per_update is None or cfg.grad_accum_steps is not None:
    raise ConfigError('--memory-budget needs --tokens-per-update N (and no --grad-accum-steps): '
                      'it chooses the micro-batch size and K itself.')
  if cfg.tokens_per_update <= 0 or cfg.tokens_per_update % (cfg.seq_len * num_devices):
    raise ConfigError(f'--tokens-per-update {cfg.tokens_per_update} must be a positive multiple '
                      f'of --seq-len x devices = {cfg.seq_len} x {num_devices}.')
  budget = parse_bytes(cfg.memory_budget)
  validate(dataclasses.replace(cfg, batch_size=1))
  apply, params = make_lm(model_config(cfg), seed=cfg.seed)
  loss_fn = make_loss_fn(apply)

  def resolved(b, k):
    return dataclasses.replace(cfg, batch_size=b, grad_accum_steps=k, tokens_per_update=None)

  def step_memory(b, k):
    c = resolved(b, k)
    accum = validate(c)
    tx = build_optimizer(c, accum)[0]
    state = jax.eval_shape(lambda p: init_train_state(p, tx, 0), params)
    rows = accum.per_call * b
    batch = {'inputs': jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32),
             'targets': jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32),
             'mask': jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.float32)}
    step = jax.jit(make_train_step(loss_fn, tx, accum), donate_argnums=0)
    return compiled_memory(step, state, batch)['total']

  rows_per_device = cfg.tokens_per_update // (cfg.seq_len * num_devices)
  plan = plan_microbatch(step_memory, budget, rows_per_device)
  return resolved(plan.microbatch_size, plan.num_microbatches), plan


def build_optimizer(cfg: TrainConfig, accum: AccumConfig):
  """(the accumulating optimizer, the learning-rate schedule) for a run."""
  schedule = lr_schedule(cfg)
  return accumulating_optimizer(inner_optimizer(cfg, schedule), accum), schedule
