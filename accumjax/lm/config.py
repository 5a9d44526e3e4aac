"""The settings of one LM training run: one nested `TrainConfig`, validated with clear errors.

Each setting is declared once, as a field with its flag, help, choices and check
(`lm/settings.py`); the model's settings live inside it (`cfg.model`, an
`lm.model.ModelConfig`), not mirrored, and the CLI (`experiments/train.py`) is generated from
the fields. Checkpoints and config.json store the settings *flat* under their historical names
(`batch_size`, `d_model`, `num_layers`, ...: `to_flat` / `from_flat`), and every refusal on
resume names the command-line flag (`flag`).

Not here: what is built from the settings (build.py), the training loop (train.py).
"""

import dataclasses
import math
import re

import jax

from accumjax import parallel
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
from accumjax.lm import faults, settings
from accumjax.lm.data import VOCAB_SIZE
from accumjax.lm.kplan import (  # noqa: F401 (AUTO_*, KPlan: re-exported for the trainer)
    AUTO_MIN_DWELL,
    AUTO_START_K,
    KPlan,
    check_k_plan,
    k_plan,
)
from accumjax.lm.model import ModelConfig
from accumjax.lm.settings import finite_number, is_int, setting

PRECISIONS = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}
OPTIMIZERS = ('adamw', 'sgd', 'lion')
SCHEDULES = ('cosine', 'constant')
ON_CONFIG_CHANGE = ('refuse', 'flush')
DEFAULT_NUM_MICROBATCHES = 4

_POSITIVE = (finite_number(lambda v: v > 0), 'must be a positive finite number.')
_HARMLESS, _ACCUM = 'harmless', 'accumulation'


def _k_arg(text: str):
  """--grad-accum-steps: an int, or 'auto'."""
  if text == 'auto':
    return 'auto'
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'{text!r}: an integer >= 1, or auto') from None


def _k_value(value) -> bool:
  return value == 'auto' or (is_int(value) and value >= 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of a run, each declared once (`lm/settings.py`): `python -m experiments.train
  --help` is generated from these fields.

  `microbatch_size` is per device (`--batch-size`): effective batch = microbatch_size x K x
  devices. K comes from `grad_accum_steps` (an int, or 'auto'), `grad_accum_schedule`, or
  `tokens_per_update`, or is 4; see `k_plan`.
  """
  data: str | None = setting(
      None, 'text file or directory of text files, or a built-in corpus: builtin:stdlib (the '
      'default: the Python standard library sources) or builtin:prose (the English '
      'documentation in pydoc_data/topics.py)', group='data')
  seq_len: int = setting(128, 'tokens per example', group='data', minimum=1)
  pack: bool = setting(False, 'pack examples into full rows (no padding)', group='data')
  microbatch_size: int = setting(
      8, 'micro-batch size (sequences per micro-batch, per device)', group='accumulation',
      flag='--batch-size', flat='batch_size', minimum=1, on_resume=_ACCUM)
  grad_accum_steps: int | str | None = setting(
      None, 'K, micro-batches per optimizer update (default 4); "auto": K follows the '
      'measured gradient noise scale (B_simple, smoothed), a power of two from 2 to '
      '--max-grad-accum-steps, changed at most every 10 updates', group='accumulation',
      check=(_k_value, 'must be an integer >= 1, or auto.'), on_resume=_ACCUM, parse=_k_arg,
      metavar='K|auto')
  grad_accum_schedule: str | None = setting(
      None, 'K per update as a ramp, e.g. "0:2,200:4,400:8" (from update U on, K)',
      group='accumulation', on_resume=_ACCUM, metavar='U:K,...')
  max_grad_accum_steps: int = setting(32, 'the largest K of --grad-accum-steps auto',
                                      group='accumulation', on_resume=_ACCUM)
  lr_batch_scaling: str = setting(
      'none', 'when K changes (schedule, auto), scale the learning rate by (K / first K) ** 1 '
      '(linear, SGD) or ** 0.5 (sqrt, Adam)', group='accumulation',
      choices=tuple(LR_BATCH_SCALING))
  tokens_per_update: int | None = setting(
      None, 'sets K = N / (batch size x seq len x devices); must divide', group='accumulation',
      on_resume=_ACCUM, parse=int)
  accum_mode: str = setting(
      'scan', 'scan: one call per update; multisteps: one call per micro-batch; hybrid: c '
      'micro-batches per call', group='accumulation', choices=MODES, on_resume=_ACCUM)
  microbatches_per_call: int | None = setting(
      None, 'c for hybrid mode (default K/2 for even K, else 1)', group='accumulation',
      on_resume=_ACCUM, parse=int)
  multisteps_impl: str = setting(
      'lazy', "lazy: the train step's own cycle, the optimizer runs once per update; optax: "
      'optax.MultiSteps as shipped, the optimizer runs on every call (same results)',
      group='accumulation', choices=MULTISTEPS_IMPLS, on_resume=_HARMLESS)
  memory_budget: str | None = setting(
      None, 'e.g. 2GiB: pick the largest micro-batch whose compiled step fits (XLA memory '
      'analysis), then K from --tokens-per-update', group='accumulation', on_resume=_HARMLESS,
      metavar='SIZE')
  precision: str = setting(
      'fp32', 'compute precision; params and accumulation stay float32. fp16 uses dynamic loss '
      'scaling; bf16 needs none (float32 exponent range)', group='accumulation',
      choices=tuple(PRECISIONS))
  mesh: str | None = setting(
      None, 'device mesh; default: all devices of all processes, data parallel. fsdp=F shards '
      'params, optimizer state and accumulator over F devices (data=D,fsdp=F: D groups of F). '
      'The batch size is per device: effective batch = batch x K x D x F', group='parallel',
      on_resume=_ACCUM, metavar='data=D,fsdp=F')
  fsdp_reduce: str = setting(
      'call', "with fsdp: reduce-scatter the gradients into each device's shard once per call "
      '(full-size accumulator inside the call, one collective) or after every micro-batch '
      '(accumulator a shard, one collective each)', group='parallel', choices=FSDP_REDUCES,
      on_resume=_HARMLESS)
  accumulator_memory: str = setting(
      'device', 'multisteps/hybrid: keep the float32 gradient sums between calls in device or '
      'host memory (pinned_host; moved in and out every call). On a CPU backend both are the '
      'same RAM', group='parallel', choices=ACCUMULATOR_MEMORIES, on_resume=_HARMLESS)
  dp_reduction: str = setting(
      'psum', "how devices' gradient sums meet, once per call: psum (one all-reduce) or "
      'ordered (all-gather + sum in device order: bitwise the same on any process layout, N x '
      'gradient memory)', group='parallel', choices=DP_REDUCTIONS, on_resume=_ACCUM)
  log_microbatches: bool = setting(
      False, 'also log every call (per-micro-batch view: accum 3/4)', group='logging',
      on_resume=_HARMLESS)
  noise_stats: bool = setting(
      True, 'estimate the gradient noise scale B_simple of every update from its '
      'micro-batches (logged, in metrics.jsonl and noise_scale.png; needs K x devices >= 2, '
      'else off)', group='logging', on_resume=_HARMLESS)
  nonfinite_policy: str = setting(
      'skip_update', 'skip_update: skip the whole update (params and optimizer state '
      'unchanged, cycle stays aligned); skip_microbatch: drop the bad micro-batches, '
      'renormalise by the remaining weight; raise: stop (exit 1) naming the update and '
      'micro-batch', group='nonfinite', choices=NONFINITE_POLICIES, on_resume=_HARMLESS)
  max_consecutive_skips: int = setting(
      10, 'stop (exit 1) after N skipped updates in a row (0: never)', group='nonfinite',
      minimum=0, on_resume=_HARMLESS)
  inject_faults: str | None = setting(
      None, 'fault drill: multiply the loss of micro-batch J (from 0) of update U (from 1) by '
      'V (nan default, inf, or a factor such as 1e6)', group='nonfinite', metavar='U:J[:V],...')
  optimizer: str = setting('adamw', 'the optax optimizer', group='optimization',
                           choices=OPTIMIZERS)
  lr: float = setting(3e-3, 'peak learning rate', group='optimization', check=_POSITIVE)
  weight_decay: float = setting(
      0.1, 'decoupled weight decay (adamw, lion)', group='optimization',
      check=(finite_number(lambda v: v >= 0), 'must be a finite number >= 0.'))
  warmup_steps: int = setting(20, 'linear warmup, in optimizer updates', group='optimization',
                              minimum=0)
  schedule: str = setting('cosine', 'cosine decays to lr/10 at --steps', group='optimization',
                          choices=SCHEDULES)
  clip_norm: float | None = setting(
      1.0, 'global-norm clip of the accumulated mean gradient; 0 disables',
      group='optimization', parse=lambda text: float(text) or None,
      check=(finite_number(lambda v: v > 0), 'must be a positive finite number (0 disables '
             'clipping).'))
  clip_before_accumulation: bool = setting(
      False, 'clip each micro-batch mean gradient instead (a different estimator)',
      group='optimization')
  steps: int = setting(300, 'optimizer updates', group='optimization', minimum=1,
                       on_resume=_HARMLESS)
  model: ModelConfig = ModelConfig()
  seed: int = setting(0, 'seed of the params, the data order and dropout', group='run',
                      check=(lambda v: is_int(v) and 0 <= v < 2**32,
                             'must be an integer in [0, 2**32).'))
  eval_every: int = setting(50, 'in optimizer updates', group='run', minimum=1,
                            on_resume=_HARMLESS)
  eval_batches: int = setting(8, 'eval set size, in micro-batches of the eval split',
                              group='run', minimum=1, on_resume=_HARMLESS)
  log_every: int = setting(10, 'in optimizer updates', group='run', minimum=1,
                           on_resume=_HARMLESS)
  save_every: int = setting(100, 'save every N optimizer updates, and at the end (0: never)',
                            group='checkpoints', minimum=0, on_resume=_HARMLESS)
  save_every_micro: int = setting(
      0, 'multisteps/hybrid: also save every M calls, inside a cycle (0: never)',
      group='checkpoints', minimum=0, on_resume=_HARMLESS)
  keep: int = setting(3, 'checkpoints to keep', group='checkpoints', minimum=1,
                      on_resume=_HARMLESS)

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


def replace(cfg: TrainConfig, **flat) -> TrainConfig:
  """`cfg` with settings changed by their flat names (`d_model=64`, `batch_size=4`, ...)."""
  return from_flat({**to_flat(cfg), **flat})


def _flat_fields() -> dict:
  """flat name -> (field, 'model' or None) for every setting of a run."""
  out = {settings.flat_name(f): (f, None) for f in dataclasses.fields(TrainConfig)
         if f.name != 'model'}
  out.update({f.name: (f, 'model') for f in dataclasses.fields(ModelConfig)
              if f.name != 'vocab_size'})
  return out


def to_flat(cfg: TrainConfig) -> dict:
  """The settings as one flat dict under their historical names (checkpoints, config.json)."""
  return {name: getattr(cfg.model if where else cfg, f.name)
          for name, (f, where) in _flat_fields().items()}


def from_flat(flat: dict) -> TrainConfig:
  """The inverse of `to_flat`; unknown names are a ConfigError naming them."""
  known = _flat_fields()
  unknown = sorted(set(flat) - set(known))
  if unknown:
    raise ConfigError(f'unknown settings {unknown}; known: {sorted(known)}.')
  model = ModelConfig(**{known[k][0].name: v for k, v in flat.items() if known[k][1]})
  return TrainConfig(model=model,
                     **{known[k][0].name: v for k, v in flat.items() if not known[k][1]})


def flag(name: str) -> str:
  """The command-line flag of a flat setting name."""
  found = _flat_fields().get(name)
  return settings.flag_of(found[0]) if found else '--' + name.replace('_', '-')


def on_resume(name: str) -> str | None:
  """What a resumed run may do with a flat setting (see `settings.ON_RESUME`)."""
  return _flat_fields()[name][0].metadata['setting']['on_resume']


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


def make_mesh(spec: str | None):
  """The mesh of --mesh (`parallel.make_mesh`), its refusals said as the flag."""
  try:
    return parallel.make_mesh(*parse_mesh(spec))
  except ConfigError as e:
    raise ConfigError(re.sub(r'make_mesh\(([^)]*)\)', r'--mesh \1', str(e))) from None


def _check_model(cfg: TrainConfig):
  """What the model's settings need of each other and of the data."""
  m = cfg.model
  if m.vocab_size != VOCAB_SIZE:
    raise ConfigError(f'model vocab_size {m.vocab_size}; the byte-level data has {VOCAB_SIZE}.')
  if cfg.seq_len > m.max_len:
    raise ConfigError(
        f'--seq-len {cfg.seq_len} is longer than the model allows (--max-len {m.max_len}).')
  if m.d_model % m.num_heads or (m.d_model // m.num_heads) % 2:
    raise ConfigError(f'--d-model {m.d_model} must split into --heads {m.num_heads} '
                      'heads of even size.')


# The flags of the library's AccumConfig arguments, for its errors (see `validate`).
_ACCUM_FLAGS = {'num_microbatches': 'K', 'microbatch_size': '--batch-size',
                'mode': '--accum-mode', 'microbatches_per_call': '--microbatches-per-call',
                'nonfinite': '--nonfinite-policy', 'clip_norm': '--clip-norm',
                'multisteps_impl': '--multisteps-impl', 'dp_reduction': '--dp-reduction',
                'fsdp_reduce': '--fsdp-reduce', 'accumulator_memory': '--accumulator-memory',
                'noise_stats': '--noise-stats', 'lr_batch_scaling': '--lr-batch-scaling',
                'clip_before_accumulation': '--clip-before-accumulation'}


def _as_flags(error: ConfigError) -> ConfigError:
  """A library error with its argument names (`mode='x'`) said as the flags that set them."""
  names = '|'.join(sorted(_ACCUM_FLAGS, key=len, reverse=True))
  text = re.sub(rf'\b({names})=', lambda m: _ACCUM_FLAGS[m.group(1)] + '=', str(error))
  # bare names too where they cannot be prose (`microbatches_per_call (c)`)
  text = re.sub(rf'\b({names})\b', lambda m: _ACCUM_FLAGS[m.group(1)] if '_' in m.group(1)
                else m.group(1), text)
  return ConfigError(text)


def validate(cfg: TrainConfig, num_devices: int = 1) -> AccumConfig:
  """Checks every setting; returns the AccumConfig. Raises ConfigError before any work.

  Each setting is checked once, from its declaration (`settings.check`); here only what
  involves several settings. The library's own refusals name its arguments; they are said
  here as the flags."""
  given = [name for name, v in (('--grad-accum-steps', cfg.grad_accum_steps),
                                 ('--tokens-per-update', cfg.tokens_per_update),
                                 ('--grad-accum-schedule', cfg.grad_accum_schedule))
           if v is not None]
  if len(given) > 1:
    raise ConfigError(f'give one of {", ".join(given)}, not several: each sets K.')
  settings.check(cfg)
  plan = k_plan(cfg)
  if plan is not None:
    check_k_plan(cfg, plan)
  _check_model(cfg)
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
  try:
    return AccumConfig(
        num_microbatches=k, microbatch_size=cfg.microbatch_size, mode=cfg.accum_mode,
        microbatches_per_call=per_call, compute_dtype=PRECISIONS[cfg.precision],
        clip_norm=cfg.clip_norm, clip_before_accumulation=cfg.clip_before_accumulation,
        seq_len=cfg.seq_len, num_devices=num_devices, multisteps_impl=cfg.multisteps_impl,
        nonfinite=cfg.nonfinite_policy, dp_reduction=cfg.dp_reduction,
        fsdp_reduce=cfg.fsdp_reduce, accumulator_memory=cfg.accumulator_memory,
        noise_stats=noise_stats_on(cfg, k, num_devices), lr_batch_scaling=cfg.lr_batch_scaling,
        base_num_microbatches=plan.first_k if plan is not None else None)
  except ConfigError as e:
    raise _as_flags(e) from None


def noise_stats_on(cfg: TrainConfig, k: int, num_devices: int) -> bool:
  """--noise-stats is on where it can be: with one micro-batch per update (K x devices = 1)
  there is no small-batch sample, and the run trains without the statistics."""
  return cfg.noise_stats and k * num_devices >= 2
