"""The settings of one LM training run: one nested `TrainConfig`, validated with clear errors.

Each setting is declared once, as a field with its flag, help, choices and check
(`accumjax/settings.py`). The accumulation settings are the library's own `AccumConfig`
(`cfg.accum`) and the model's are `lm.model.ModelConfig` (`cfg.model`), nested, not mirrored;
the CLI (`experiments/train.py`) is generated from the fields of all three. Checkpoints and
config.json store the settings *flat* under their historical names and flag words
(`batch_size`, `precision: fp32`, `d_model`, ...: `to_flat` / `from_flat`), and every refusal
on resume names the command-line flag (`flag`).

Not here: what is built from the settings (build.py), the training loop (train.py).
"""

import dataclasses
import math
import re

from accumjax import settings
from accumjax.config import ACCUMULATION as _ACCUM
from accumjax.config import HARMLESS as _HARMLESS
from accumjax.config import AccumConfig
from accumjax.errors import ConfigError
from accumjax.lm import faults
from accumjax.lm.data import VOCAB_SIZE
from accumjax.lm.kplan import (  # noqa: F401 (AUTO_*, KPlan: re-exported for the trainer)
  AUTO_MIN_DWELL,
  AUTO_START_K,
  KPlan,
  check_k_plan,
  k_plan,
)
from accumjax.lm.model import ModelConfig
from accumjax.settings import finite_number, is_int, setting

OPTIMIZERS = ('adamw', 'sgd', 'lion')
SCHEDULES = ('cosine', 'constant')
ON_CONFIG_CHANGE = ('refuse', 'flush')
# Model and batch sizes by name (--preset): settings by their flat names, in flag words; flags
# given beside a preset win. 524,288 tokens per update throughout; seq 1024 and bfloat16 for
# the sizes of the scale and remat tables (docs/scale.md); 'guide': the batch-size guide's
# example (seq 2048, 4 sequences per device) on the 85M shape.
PRESETS = {
    '85m': dict(d_model=768, num_layers=12, num_heads=12, max_len=1024, seq_len=1024,
                precision='bf16', tokens_per_update=524_288),
    '1.2b': dict(d_model=2048, num_layers=24, num_heads=16, max_len=1024, seq_len=1024,
                 precision='bf16', batch_size=1, tokens_per_update=524_288),
    'guide': dict(d_model=768, num_layers=12, num_heads=12, max_len=2048, seq_len=2048,
                  precision='bf16', batch_size=4, tokens_per_update=524_288),
}
DEFAULT_NUM_MICROBATCHES = 4

_POSITIVE = (finite_number(lambda v: v > 0), 'must be a positive finite number.')


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
  """Every setting of a run, each declared once (`accumjax/settings.py`): `python -m
  experiments.train --help` is generated from these fields and those of the nested configs.

  `accum` is the library's `AccumConfig` as this run uses it on one device: the settings given
  (micro-batch size per device, mode, precision, ...) and, derived here from the others, K
  (`num_microbatches`: from `grad_accum_steps`, an int or 'auto', `grad_accum_schedule` or
  `tokens_per_update`, else 4; see `k_plan`; with `memory_budget` the planner chooses it),
  the noise switch and the base K. `validate(cfg, num_devices)` gives it for a mesh. The
  effective batch is accum.microbatch_size x K x devices. Construction checks every setting
  and raises ConfigError naming the flag.
  """
  data: str | None = setting(
      None, 'text file or directory of text files, or a built-in corpus: builtin:stdlib (the '
      'default: the Python standard library sources) or builtin:prose (the English '
      'documentation in pydoc_data/topics.py)', group='data')
  pack: bool = setting(False, 'pack examples into full rows (no padding)', group='data')
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
  tokens_per_update: int | None = setting(
      None, 'sets K = N / (batch size x seq len x devices); must divide', group='accumulation',
      on_resume=_ACCUM, parse=int)
  memory_budget: str | None = setting(
      None, 'e.g. 2GiB: pick the largest micro-batch whose compiled step fits (XLA memory '
      'analysis), then K from --tokens-per-update', group='accumulation', on_resume=_HARMLESS,
      metavar='SIZE')
  mesh: str | None = setting(
      None, 'device mesh; default: all devices of all processes, data parallel. fsdp=F shards '
      'params, optimizer state and accumulator over F devices (data=D,fsdp=F: D groups of F). '
      'The batch size is per device: effective batch = batch x K x D x F', group='parallel',
      on_resume=_ACCUM, metavar='data=D,fsdp=F')
  log_microbatches: bool = setting(
      False, 'also log every call (per-micro-batch view: accum 3/4)', group='logging',
      on_resume=_HARMLESS)
  noise_stats: bool = setting(
      True, 'estimate the gradient noise scale B_simple of every update from its '
      'micro-batches (logged, in metrics.jsonl and noise_scale.png; needs K x devices >= 2, '
      'else off)', group='logging', on_resume=_HARMLESS)
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
  steps: int = setting(300, 'optimizer updates', group='optimization', minimum=1,
                       on_resume=_HARMLESS)
  accum: AccumConfig = None  # the accumulation settings; default: `accum_settings()`
  model: ModelConfig = ModelConfig()
  seed: int = setting(0, 'seed of the params, the data order and dropout', group='run',
                      check=(lambda v: is_int(v) and 0 <= v < 2**32,
                             'must be an integer in [0, 2**32).'))
  eval_every: int = setting(50, 'in optimizer updates', group='run', minimum=1,
                            on_resume=_HARMLESS)
  eval_batches: int = setting(8, 'eval set size, in global micro-batches (batch size x '
                              'devices rows) of the eval split',
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

  def __post_init__(self):
    if self.accum is None:
      object.__setattr__(self, 'accum', accum_settings())
    if not isinstance(self.accum, AccumConfig):
      raise ConfigError(f'accum={self.accum!r} must be an AccumConfig (see accum_settings).')
    given = [name for name, v in (('--grad-accum-steps', self.grad_accum_steps),
                                   ('--tokens-per-update', self.tokens_per_update),
                                   ('--grad-accum-schedule', self.grad_accum_schedule))
             if v is not None]
    if len(given) > 1:
      raise ConfigError(f'give one of {", ".join(given)}, not several: each sets K.')
    settings.check(self)
    plan = k_plan(self)
    if plan is not None:
      check_k_plan(self, plan)
    _check_model(self)
    # With --memory-budget and --tokens-per-update the planner chooses the micro-batch and K
    # (build.plan_for_budget); until then K is a stand-in that every other setting allows.
    k = self.num_microbatches(1) if self.memory_budget is None or \
        self.tokens_per_update is None else 2 * (self.accum.microbatches_per_call or 1)
    object.__setattr__(self, 'accum', _derived(self, plan, k, 1))

  def num_microbatches(self, num_devices: int = 1) -> int:
    """K, from --grad-accum-steps or --tokens-per-update (default 4); with a schedule or
    auto, the largest K an update may hold (the step is built for it)."""
    plan = k_plan(self)
    if plan is not None:
      return plan.max_k
    if self.tokens_per_update is None:
      return DEFAULT_NUM_MICROBATCHES if self.grad_accum_steps is None else \
          self.grad_accum_steps
    b, seq = self.accum.microbatch_size, self.accum.seq_len
    per_mb = b * seq * num_devices
    if self.tokens_per_update <= 0 or self.tokens_per_update % per_mb:
      raise ConfigError(
          f'--tokens-per-update {self.tokens_per_update} is not a positive multiple of '
          f'batch size x seq len x devices = {b} x {seq} x {num_devices} = {per_mb}; allowed: '
          f'{per_mb}, {2 * per_mb}, {4 * per_mb}, ...')
    return self.tokens_per_update // per_mb


def accum_settings(**given) -> AccumConfig:
  """An AccumConfig carrying the run's accumulation settings: the LM's defaults (micro-batch 8,
  seq len 128, clip norm 1) with `given` (AccumConfig arguments) over them. K, the devices and
  the noise switch are stand-ins that `TrainConfig` derives from its other settings."""
  given = {'microbatch_size': 8, 'seq_len': 128, 'clip_norm': 1.0, **given}
  c = given.get('microbatches_per_call')
  try:
    return AccumConfig(num_microbatches=2 * (c if is_int(c) and c >= 1 else 1), **given)
  except ConfigError as e:
    raise _as_flags(e) from None


def _derived(cfg: TrainConfig, plan, k: int, num_devices: int, per_call=None) -> AccumConfig:
  """cfg.accum with K, the devices, the noise switch and the base K of this run."""
  try:
    return dataclasses.replace(
        cfg.accum, num_microbatches=k, num_devices=num_devices,
        noise_stats=noise_stats_on(cfg, k, num_devices),
        microbatches_per_call=per_call or cfg.accum.microbatches_per_call,
        base_num_microbatches=plan.first_k if plan is not None else None)
  except ConfigError as e:
    raise _as_flags(e) from None


def replace(cfg: TrainConfig, **flat) -> TrainConfig:
  """`cfg` with settings changed by their flat names (`d_model=64`, `batch_size=4`, ...)."""
  return from_flat({**to_flat(cfg), **flat})


def _flat_fields() -> dict:
  """flat name -> (field, where: None, 'accum' or 'model') for every setting of a run."""
  out = {settings.flat_name(f): (f, None) for f, _ in settings.settings_of(TrainConfig)}
  out.update({settings.flat_name(f): (f, 'accum') for f, _ in settings.settings_of(AccumConfig)})
  out.update({f.name: (f, 'model') for f, _ in settings.settings_of(ModelConfig)})
  return out


def to_flat(cfg: TrainConfig) -> dict:
  """The settings as one flat dict under their historical names and flag words (checkpoints,
  config.json)."""
  return {name: settings.to_word(f, getattr(getattr(cfg, where) if where else cfg, f.name))
          for name, (f, where) in _flat_fields().items()}


def from_flat(flat: dict) -> TrainConfig:
  """The inverse of `to_flat`; unknown names are a ConfigError naming them."""
  known = _flat_fields()
  unknown = sorted(set(flat) - set(known))
  if unknown:
    raise ConfigError(f'unknown settings {unknown}; known: {sorted(known)}.')
  parts = {None: {}, 'accum': {}, 'model': {}}
  for name, value in flat.items():
    field, where = known[name]
    parts[where][field.name] = settings.from_word(field, value)
  return TrainConfig(accum=accum_settings(**parts['accum']), model=ModelConfig(**parts['model']),
                     **parts[None])


def flag(name: str) -> str:
  """The command-line flag of a flat setting name."""
  found = _flat_fields().get(name)
  return settings.flag_of(found[0]) if found else '--' + name.replace('_', '-')


def on_resume(name: str) -> str | None:
  """What a resumed run may do with a flat setting (see `settings.ON_RESUME`)."""
  return _flat_fields()[name][0].metadata['setting']['on_resume']


def _check_model(cfg: TrainConfig):
  """What the model's settings need of each other and of the data."""
  m = cfg.model
  if m.vocab_size != VOCAB_SIZE:
    raise ConfigError(f'model vocab_size {m.vocab_size}; the byte-level data has {VOCAB_SIZE}.')
  if cfg.accum.seq_len > m.max_len:
    raise ConfigError(
        f'--seq-len {cfg.accum.seq_len} is longer than the model allows (--max-len {m.max_len}).')
  if m.d_model % m.num_heads or (m.d_model // m.num_heads) % 2:
    raise ConfigError(f'--d-model {m.d_model} must split into --heads {m.num_heads} '
                      'heads of even size.')


def _accum_flags() -> dict:
  """AccumConfig argument -> the flag that sets it (K and the noise switch: derived)."""
  return {'num_microbatches': 'K', 'noise_stats': '--noise-stats',
          **{f.name: settings.flag_of(f) for f, _ in settings.settings_of(AccumConfig)}}


def _as_flags(error: ConfigError) -> ConfigError:
  """A library error with its argument names (`mode='x'`) said as the flags that set them
  (`--accum-mode 'x'`)."""
  flags = _accum_flags()
  names = '|'.join(sorted(flags, key=len, reverse=True))
  text = re.sub(rf'\b({names})=', lambda m: flags[m.group(1)] + ' ', str(error))
  # bare names too where they cannot be prose (`microbatches_per_call (c)`)
  text = re.sub(rf'\b({names})\b', lambda m: flags[m.group(1)] if '_' in m.group(1)
                else m.group(1), text)
  return ConfigError(text)


def validate(cfg: TrainConfig, num_devices: int = 1) -> AccumConfig:
  """The run's AccumConfig on `num_devices` devices. Raises ConfigError before any work.

  Each setting was checked when `cfg` was made (`TrainConfig.__post_init__`); here only what
  depends on the devices. The library's own refusals name its arguments; they are said here
  as the flags."""
  plan = k_plan(cfg)
  k = cfg.num_microbatches(num_devices)
  faults.parse(cfg.inject_faults, k)
  per_call = None
  if cfg.accum.mode == 'hybrid' and plan is not None:  # c must divide every K of the plan
    per_call = math.gcd(*(plan.schedule.ks if plan.schedule else plan.allowed))
  accum = _derived(cfg, plan, k, num_devices, per_call)
  if cfg.save_every_micro and accum.calls_per_update == 1:
    raise ConfigError(
        f'--save-every-micro {cfg.save_every_micro} saves between the calls of an update, but '
        f'{accum.mode} mode with K={k} makes one call per update, so there is nothing '
        'between them; use --accum-mode multisteps or hybrid, or --save-every.')
  return accum


def noise_stats_on(cfg: TrainConfig, k: int, num_devices: int) -> bool:
  """--noise-stats is on where it can be: with one micro-batch per update (K x devices = 1)
  there is no small-batch sample, and the run trains without the statistics."""
  return cfg.noise_stats and k * num_devices >= 2
