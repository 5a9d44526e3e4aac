"""K per update of a run whose K changes: a fixed ramp (--grad-accum-schedule) or auto
(--grad-accum-steps auto), and what such a plan needs of the other settings.

Not here: the schedules themselves (accumjax.schedules), choosing auto K (lm/train.py).
"""

import math

from accumjax.errors import ConfigError
from accumjax.schedules import KSchedule, parse_k_schedule
from accumjax.settings import is_int

# --grad-accum-steps auto: K starts here and moves at most this often (in updates).
AUTO_START_K = 2
AUTO_MIN_DWELL = 10


class KPlan:
  """K per update of a run whose K changes: a fixed schedule, or auto."""

  def __init__(self, schedule: KSchedule | None = None, auto_max: int | None = None):
    self.schedule, self.auto_max = schedule, auto_max

  @property
  def auto(self) -> bool:
    return self.schedule is None

  @property
  def max_k(self) -> int:
    """The largest K an update can have (the step is built for it): auto's largest power of
    two, not --max-grad-accum-steps itself."""
    return self.schedule.max_k if self.schedule else max(self.allowed)

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


def k_plan(cfg) -> KPlan | None:
  """The K plan of --grad-accum-schedule or --grad-accum-steps auto; None for a fixed K."""
  if cfg.grad_accum_schedule is not None:
    try:
      return KPlan(schedule=parse_k_schedule(cfg.grad_accum_schedule))
    except ConfigError as e:
      raise ConfigError(str(e).replace('spec=', '--grad-accum-schedule ', 1)) from None
  if cfg.grad_accum_steps == 'auto':
    if not is_int(cfg.max_grad_accum_steps) or cfg.max_grad_accum_steps < AUTO_START_K:
      raise ConfigError(f'--max-grad-accum-steps {cfg.max_grad_accum_steps!r} must be an '
                        f'integer >= {AUTO_START_K}.')
    return KPlan(auto_max=cfg.max_grad_accum_steps)
  return None


def check_k_plan(cfg, plan: KPlan):
  """A K that changes between updates: what it needs of the other settings."""
  ks = plan.schedule.ks if plan.schedule else plan.allowed
  if cfg.accum.mode != 'scan' and cfg.accum.multisteps_impl != 'lazy':
    raise ConfigError(f'a K that changes ({plan.describe()}) needs --multisteps-impl lazy: '
                      'optax.MultiSteps counts a fixed K.')
  c = cfg.accum.microbatches_per_call
  if cfg.accum.mode == 'hybrid' and c is not None and any(k % c for k in ks):
    raise ConfigError(f'--microbatches-per-call {c} must divide every K of '
                      f'{plan.describe()}; allowed: {sorted(_divisors(math.gcd(*ks)))}.')
  if plan.auto and not cfg.noise_stats:
    raise ConfigError('--grad-accum-steps auto chooses K from the gradient noise scale: it '
                      'needs --noise-stats (the default).')


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]
