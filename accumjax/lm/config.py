"""The settings of one LM training run: one nested `TrainConfig`, validated with clear errors.

The model's settings live inside it (`cfg.model`, an `lm.model.ModelConfig`), not mirrored.
The CLI (`experiments/train.py`) takes its choices from the constants here. Checkpoints and
config.json store the settings *flat* under their historical names (`batch_size`, `d_model`,
`num_layers`, ...: `to_flat` / `from_flat`), so runs saved before this layout still resume, and
every refusal on resume names the command-line flag (`flag`).

Not here: what is built from the settings (build.py), the training loop (train.py).
"""

import dataclasses
import math

import jax

from accumjax.config import (
  ACCUMULATOR_MEMORIES,
  DP_REDUCTIONS,
  FSDP_REDUCES,
  LR_BATCH_SCALING,
  MODES,
  MULTISTEPS_IMPLS,
  NONFINITE_POLICIES,
  AccumConfig,
)
from accumjax.core import ConfigError
from accumjax.lm import faults
from accumjax.lm.data import VOCAB_SIZE
from accumjax.lm.model import POSITIONS, ModelConfig
from accumjax.schedules import KSchedule, parse_k_schedule

PRECISIONS = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}
OPTIMIZERS = ('adamw', 'sgd', 'lion')
SCHEDULES = ('cosine', 'constant')
ON_CONFIG_CHANGE = ('refuse', 'flush')
DEFAULT_NUM_MICROBATCHES = 4
# What may change when a run is resumed (flat names). Settings that only change what is
# logged or saved, and the fault policy (it changes nothing while values are finite; a run
# stopped by 'raise' is meant to be resumed with 'skip_update'):
HARMLESS = ('eval_every', 'eval_batches', 'log_every', 'log_microbatches', 'save_every',
            'save_every_micro', 'keep', 'steps', 'multisteps_impl', 'memory_budget',
            'nonfinite_policy', 'max_consecutive_skips', 'noise_stats', 'fsdp_reduce',
            'accumulator_memory')
# The shape of an update: safe to change between cycles, never inside one without a policy.
# (`mesh` and `dp_reduction` too: the device count is compared as resolved, see resume.py.)
ACCUMULATION = ('batch_size', 'grad_accum_steps', 'tokens_per_update', 'accum_mode',
                'microbatches_per_call', 'mesh', 'dp_reduction', 'grad_accum_schedule',
                'max_grad_accum_steps')
# --grad-accum-steps auto: K starts here and moves at most this often (in updates).
AUTO_START_K = 2
AUTO_MIN_DWELL = 10
# Flat names that differ from the field names, and flags that differ from --flat-name.
_FLAT_NAMES = {'microbatch_size': 'batch_size'}
_FLAGS = {'num_layers': '--layers', 'num_heads': '--heads'}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of a run; `python -m experiments.train --help` documents each flag.

  `microbatch_size` is per device (`--batch-size`): effective batch = microbatch_size x K x
  devices. K comes from `grad_accum_steps` (an int, or 'auto'), `grad_accum_schedule`, or
  `tokens_per_update`, or is 4; see `k_plan`.
  """
  # data
  data: str | None = None
  seq_len: int = 128
  pack: bool = False
  # accumulation
  microbatch_size: int = 8
  grad_accum_steps: int | str | None = None
  tokens_per_update: int | None = None
  grad_accum_schedule: str | None = None
  max_grad_accum_steps: int = 32
  lr_batch_scaling: str = 'none'
  accum_mode: str = 'scan'
  microbatches_per_call: int | None = None
  multisteps_impl: str = 'lazy'
  memory_budget: str | None = None
  precision: str = 'fp32'
  # non-finite values
  nonfinite_policy: str = 'skip_update'
  max_consecutive_skips: int = 10
  inject_faults: str | None = None
  # data parallelism and sharded state: 'data=D', 'fsdp=F', 'data=D,fsdp=F' or None (all
  # devices, data parallel); how the devices' sums meet; where FSDP reduce-scatters
  mesh: str | None = None
  dp_reduction: str = 'psum'
  fsdp_reduce: str = 'call'
  # where multisteps/hybrid keep the gradient sums between calls: 'device' or 'host' memory
  accumulator_memory: str = 'device'
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
  model: ModelConfig = ModelConfig()
  # run
  seed: int = 0
  eval_every: int = 50
  eval_batches: int = 8
  log_every: int = 10
  log_microbatches: bool = False
  noise_stats: bool = True  # on where K x devices >= 2 (see validate)
  # checkpoints (0 disables)
  save_every: int = 100
  save_every_micro: int = 0
  keep: int = 3

  def num_microbatches(self, num_devices: int = 1) -> int:
    """K, from --grad-accum-steps or --tokens-per-update (default 4); with a schedule or
    auto, the largest K an update may hold (the step is built for it)."""
    plan = k_plan(self)
    if plan is not None:
      return plan.max_k
    if self.tokens_per_update is None:
      return DEFAULT_NUM_MICROBATCHES if self.grad_accum_steps is None else \
          self.grad_accum_steps
    per_mb = self.microbatch_size * self.seq_len * num_devices
    if self.tokens_per_update <= 0 or self.tokens_per_update % per_mb:
      raise ConfigError(
          f'--tokens-per-update {self.tokens_per_update} is not a positive multiple of '
          f'batch size x seq len x devices = {self.microbatch_size} x {self.seq_len} x '
          f'{num_devices} = {per_mb}; allowed: {per_mb}, {2 * per_mb}, {4 * per_mb}, ...')
    return self.tokens_per_update // per_mb


class KPlan:
  """K per update of a run whose K changes: a fixed schedule, or auto."""

  def __init__(self, schedule: KSchedule | None = None, auto_max: int | None = None):
    self.schedule, self.auto_max = schedule, auto_max

  @property
  def auto(self) -> bool:
    return self.schedule is None

  @property
  def max_k(self) -> int:
    return self.schedule.max_k if self.schedule else self.auto_max

  @property
  def first_k(self) -> int:
    return self.schedule.at(0) if self.schedule else AUTO_START_K

  @property
  def allowed(self) -> tuple[int, ...]:
    """auto: powers of two from AUTO_START_K to the largest allowed."""
    return tuple(2**i for i in range(1, 31) if AUTO_START_K <= 2**i <= self.auto_max)

  def describe(self) -> str:
    if self.schedule:
      return f'schedule {self.schedule} (from update U on, K)'
    return (f'auto from B_simple: K in {{{", ".join(map(str, self.allowed))}}}, starting at '
            f'{AUTO_START_K}, at most one change per {AUTO_MIN_DWELL} updates')


def k_plan(cfg: TrainConfig) -> KPlan | None:
  """The K plan of --grad-accum-schedule or --grad-accum-steps auto; None for a fixed K."""
  if cfg.grad_accum_schedule is not None:
    return KPlan(schedule=parse_k_schedule(cfg.grad_accum_schedule))
  if cfg.grad_accum_steps == 'auto':
    _int_at_least('max_grad_accum_steps', cfg.max_grad_accum_steps, minimum=AUTO_START_K)
    return KPlan(auto_max=cfg.max_grad_accum_steps)
  return None


def replace(cfg: TrainConfig, **flat) -> TrainConfig:
  """`cfg` with settings changed by their flat names (`d_model=64`, `batch_size=4`, ...)."""
  return from_flat({**to_flat(cfg), **flat})


def to_flat(cfg: TrainConfig) -> dict:
  """The settings as one flat dict under their historical names (checkpoints, config.json)."""
  out = {}
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if field.name == 'model':
      out.update({k: v for k, v in dataclasses.asdict(value).items() if k != 'vocab_size'})
    else:
      out[_FLAT_NAMES.get(field.name, field.name)] = value
  return out


def from_flat(flat: dict) -> TrainConfig:
  """The inverse of `to_flat`; unknown names are a ConfigError naming them."""
  model_names = {f.name for f in dataclasses.fields(ModelConfig)} - {'vocab_size'}
  top = {_FLAT_NAMES.get(f.name, f.name): f.name for f in dataclasses.fields(TrainConfig)
         if f.name != 'model'}
  unknown = sorted(set(flat) - model_names - set(top))
  if unknown:
    raise ConfigError(f'unknown settings {unknown}; known: {sorted(model_names | set(top))}.')
  model = ModelConfig(**{k: v for k, v in flat.items() if k in model_names})
  return TrainConfig(model=model, **{top[k]: v for k, v in flat.items() if k in top})


def flag(name: str) -> str:
  """The command-line flag of a flat setting name."""
  return _FLAGS.get(name, '--' + name.replace('_', '-'))


def parse_mesh(spec: str | None) -> tuple[int | None, int]:
  """--mesh: 'data=D', 'fsdp=F' or 'data=D,fsdp=F' -> (D, F); None or 'auto' -> (None, 1) (all
  devices, data parallel). A D left out is all devices / F."""
  if spec is None or spec == 'auto':
    return None, 1
  sizes = {}
  for part in str(spec).split(','):
    name, _, size = part.partition('=')
    if name not in ('data', 'fsdp') or name in sizes or not size.isdigit() or int(size) < 1:
      raise ConfigError(
          f'--mesh {spec!r}; allowed: auto, data=D, fsdp=F or data=D,fsdp=F with D, F >= 1 '
          f'(data-parallel and parameter-sharding sizes; this run has {jax.device_count()} '
          'devices).')
    sizes[name] = int(size)
  return sizes.get('data'), sizes.get('fsdp', 1)


def _int_at_least(name, value, minimum=1):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f'{flag(name)} {value!r} must be an integer >= {minimum}.')


def _check_model(cfg: TrainConfig):
  m = cfg.model
  for name in ('d_model', 'num_layers', 'num_heads', 'mlp_ratio', 'max_len'):
    _int_at_least(name, getattr(m, name))
  if m.vocab_size != VOCAB_SIZE:
    raise ConfigError(f'model vocab_size {m.vocab_size}; the byte-level data has {VOCAB_SIZE}.')
  if cfg.seq_len > m.max_len:
    raise ConfigError(
        f'--seq-len {cfg.seq_len} is longer than the model allows (--max-len {m.max_len}).')
  if m.d_model % m.num_heads or (m.d_model // m.num_heads) % 2:
    raise ConfigError(f'--d-model {m.d_model} must split into --heads {m.num_heads} '
                      'heads of even size.')
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f'--dropout {m.dropout} must be in [0, 1).')


def validate(cfg: TrainConfig, num_devices: int = 1) -> AccumConfig:
  """Checks every setting; returns the AccumConfig. Raises ConfigError before any work."""
  given = [name for name, v in (('--grad-accum-steps', cfg.grad_accum_steps),
                                 ('--tokens-per-update', cfg.tokens_per_update),
                                 ('--grad-accum-schedule', cfg.grad_accum_schedule))
           if v is not None]
  if len(given) > 1:
    raise ConfigError(f'give one of {", ".join(given)}, not several: each sets K.')
  for name in ('seq_len', 'steps', 'eval_every', 'eval_batches', 'log_every', 'keep'):
    _int_at_least(name, getattr(cfg, name))
  _int_at_least('batch_size', cfg.microbatch_size)
  for name in ('warmup_steps', 'save_every', 'save_every_micro', 'max_consecutive_skips'):
    _int_at_least(name, getattr(cfg, name), minimum=0)
  if cfg.grad_accum_steps is not None and cfg.grad_accum_steps != 'auto':
    _int_at_least('grad_accum_steps', cfg.grad_accum_steps)
  if cfg.lr_batch_scaling not in LR_BATCH_SCALING:
    raise ConfigError(f'--lr-batch-scaling {cfg.lr_batch_scaling!r}; allowed: '
                      f'{", ".join(LR_BATCH_SCALING)}.')
  plan = k_plan(cfg)
  if plan is not None:
    _check_k_plan(cfg, plan)
  _check_model(cfg)
  if not (math.isfinite(cfg.lr) and cfg.lr > 0):
    raise ConfigError(f'--lr {cfg.lr} must be a positive finite number.')
  if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
    raise ConfigError(f'--weight-decay {cfg.weight_decay} must be a finite number >= 0.')
  if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
    raise ConfigError(f'--seed {cfg.seed!r} must be an integer in [0, 2**32).')
  choices = {'precision': tuple(PRECISIONS), 'optimizer': OPTIMIZERS, 'schedule': SCHEDULES,
             'nonfinite_policy': NONFINITE_POLICIES, 'accum_mode': MODES,
             'multisteps_impl': MULTISTEPS_IMPLS, 'dp_reduction': DP_REDUCTIONS,
             'fsdp_reduce': FSDP_REDUCES, 'accumulator_memory': ACCUMULATOR_MEMORIES}
  for name, allowed in choices.items():
    if getattr(cfg, name) not in allowed:
      raise ConfigError(f'{flag(name)} {getattr(cfg, name)!r}; allowed: {", ".join(allowed)}.')
  if cfg.model.positions not in POSITIONS:
    raise ConfigError(f'--positions {cfg.model.positions!r}; allowed: {", ".join(POSITIONS)}.')
  if cfg.clip_norm is not None and not (math.isfinite(cfg.clip_norm) and cfg.clip_norm > 0):
    raise ConfigError(f'--clip-norm {cfg.clip_norm} must be a positive finite number '
                      '(0 disables clipping).')
  k = cfg.num_microbatches(num_devices)
  faults.parse(cfg.inject_faults, k)
  per_call = cfg.microbatches_per_call
  if cfg.accum_mode == 'hybrid' and per_call is None:
    per_call = k // 2 if k % 2 == 0 else 1
    if plan is not None:  # c must divide every K of the plan
      per_call = math.gcd(*(plan.schedule.ks if plan.schedule else plan.allowed))
  calls = 1 if cfg.accum_mode == 'scan' else k // (per_call or 1)
  if cfg.save_every_micro and calls == 1:
    raise ConfigError(
        f'--save-every-micro {cfg.save_every_micro} saves between the calls of an update, but '
        f'{cfg.accum_mode} mode with K={k} makes one call per update, so there is nothing '
        'between them; use --accum-mode multisteps or hybrid, or --save-every.')
  return AccumConfig(
      num_microbatches=k, microbatch_size=cfg.microbatch_size, mode=cfg.accum_mode,
      microbatches_per_call=per_call, compute_dtype=PRECISIONS[cfg.precision],
      clip_norm=cfg.clip_norm, clip_before_accumulation=cfg.clip_before_accumulation,
      seq_len=cfg.seq_len, num_devices=num_devices, multisteps_impl=cfg.multisteps_impl,
      nonfinite=cfg.nonfinite_policy, dp_reduction=cfg.dp_reduction,
      fsdp_reduce=cfg.fsdp_reduce, accumulator_memory=cfg.accumulator_memory,
      noise_stats=noise_stats_on(cfg, k, num_devices), lr_batch_scaling=cfg.lr_batch_scaling,
      base_num_microbatches=plan.first_k if plan is not None else None)


def _check_k_plan(cfg: TrainConfig, plan: KPlan):
  """A K that changes between updates: what it needs of the other settings."""
  ks = plan.schedule.ks if plan.schedule else plan.allowed
  if cfg.accum_mode != 'scan' and cfg.multisteps_impl != 'lazy':
    raise ConfigError(f'a K that changes ({plan.describe()}) needs --multisteps-impl lazy: '
                      'optax.MultiSteps counts a fixed K.')
  c = cfg.microbatches_per_call
  if cfg.accum_mode == 'hybrid' and c is not None and any(k % c for k in ks):
    raise ConfigError(f'--microbatches-per-call {c} must divide every K of '
                      f'{plan.describe()}; allowed: {sorted(_divisors(math.gcd(*ks)))}.')
  if plan.auto and not cfg.noise_stats:
    raise ConfigError('--grad-accum-steps auto chooses K from the gradient noise scale: it '
                      'needs --noise-stats (the default).')


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def noise_stats_on(cfg: TrainConfig, k: int, num_devices: int) -> bool:
  """--noise-stats is on where it can be: with one micro-batch per update (K x devices = 1)
  there is no small-batch sample, and the run trains without the statistics."""
  if not isinstance(cfg.noise_stats, bool):
    raise ConfigError(f'--noise-stats {cfg.noise_stats!r} must be true or false.')
  return cfg.noise_stats and k * num_devices >= 2
