"""The gradient noise scale smoothed over updates, and how to read it: `SmoothedNoiseScale`.

One update's estimate (`core.noise_scale`: `g_sq`, `trace_sigma`, `b_simple`) is noisy: g_sq
is the difference of two noisy terms and is often <= 0 on a single update. McCandlish et al.
(2018, app. A) smooth the numerator and the denominator separately over updates and take
their ratio; that is what this does, on the host, with plain floats (its `state` is JSON and
goes in a checkpoint's metadata).

Reading it: B_simple = tr(Sigma) / |G|^2 is a batch size **in units of the loss weight** (the
`weight` your loss_fn returns: tokens for an LM, examples for a classifier). It is the batch
at which the gradient's noise equals its signal; the paper finds the critical batch size near
it. When the smoothed |G|^2 is not above zero, the true gradient is within the noise of its
estimate: the updates seen so far cannot tell |G|^2 from 0, and B_simple is **not resolved**
(`b_simple()` is NaN, never a negative batch size). It resolves with more updates (a longer
smoothing), a larger K (more samples per update) or later in training. An estimate far above
the weight of one update (B_simple >> W) is resolved only loosely: the update's batch is much
smaller than the noise scale it measures, so the value is a lower bound's order of magnitude.
"""

import math

from accumjax.errors import ConfigError


class SmoothedNoiseScale:
  """Exponential moving averages of tr(Sigma) and |G|^2 over updates; B_simple their ratio.

  Args:
    decay: the EMA's decay per update (0.9: about 10 updates).
    state: a `state` from before (a resumed run), or None.

  Feed it every update's metrics (`update(metrics)`, the train step's `g_sq` and
  `trace_sigma`); skipped updates and NaN estimates (fewer than 2 samples) are left out.
  """

  def __init__(self, decay: float = 0.9, state: list | None = None):
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
      raise ConfigError(f'decay={decay!r} must be a number in [0, 1).')
    if state is not None and (not isinstance(state, (list, tuple)) or len(state) != 2):
      raise ConfigError(f'state={state!r}; allowed: None or [trace_sigma EMA, g_sq EMA] '
                        '(SmoothedNoiseScale.state).')
    self.decay = float(decay)
    self.trace_sigma, self.g_sq = (None, None) if state is None else map(float, state)

  @property
  def state(self) -> list | None:
    """[EMA of trace_sigma, EMA of g_sq], or None before the first estimate (JSON)."""
    return None if self.trace_sigma is None else [self.trace_sigma, self.g_sq]

  def update(self, metrics: dict, skipped: bool = False) -> float:
    """Adds one update's estimate (its `g_sq` and `trace_sigma`); returns `b_simple()`."""
    try:
      trace, g_sq = float(metrics['trace_sigma']), float(metrics['g_sq'])
    except KeyError as e:
      raise ConfigError(f'metrics has no {e}: train with noise_stats=True (AccumConfig).') \
          from None
    if not skipped and math.isfinite(trace) and math.isfinite(g_sq):
      if self.trace_sigma is None:
        self.trace_sigma, self.g_sq = trace, g_sq
      else:
        d = self.decay
        self.trace_sigma = d * self.trace_sigma + (1 - d) * trace
        self.g_sq = d * self.g_sq + (1 - d) * g_sq
    return self.b_simple()

  @property
  def resolved(self) -> bool:
    """Whether the smoothed |G|^2 is above zero (see the module docstring)."""
    return self.g_sq is not None and self.g_sq > 0

  def b_simple(self) -> float:
    """The smoothed B_simple, in units of the loss weight; NaN while not resolved."""
    return self.trace_sigma / self.g_sq if self.resolved else math.nan

  def reading(self, unit: str = 'units of loss weight') -> str:
    """B_simple in words: the value, or why there is none yet."""
    if self.g_sq is None:
      return 'no estimate yet (needs updates of >= 2 micro-batches with noise_stats=True)'
    if not self.resolved:
      return ('not resolved: |G|^2 is within its noise so far (more updates, a larger K, or '
              'later in training)')
    return f'B_simple ~ {self.b_simple():,.0f} {unit}'
