"""The memory planner: largest micro-batch whose compiled step fits, from XLA's accounting."""

import dataclasses

import pytest

from accumjax import planner
from accumjax.core import ConfigError
from accumjax.lm.build import plan_for_budget
from tests.helpers import train_config

TINY = train_config(seq_len=32, d_model=32, num_layers=1, num_heads=2, max_len=64,
                    tokens_per_update=32 * 16, memory_budget='1GiB')


def test_parse_bytes():
  assert planner.parse_bytes('2GiB') == 2 * 2**30
  assert planner.parse_bytes('512MiB') == 512 * 2**20
  assert planner.parse_bytes('1.5GB') == 1_500_000_000
  assert planner.parse_bytes('1000') == 1000
  for bad in ('lots', '-1GiB', '2 parsecs', '0'):
    with pytest.raises(ConfigError, match='memory size'):
      planner.parse_bytes(bad)


def test_plan_picks_the_largest_microbatch_that_fits():
  # With a generous budget the whole update is one micro-batch.
  cfg, plan = plan_for_budget(TINY)
  assert (plan.microbatch_size, plan.num_microbatches) == (16, 1)
  assert (cfg.accum.microbatch_size, cfg.grad_accum_steps, cfg.tokens_per_update) == (16, 1, None)
  full = plan.predicted_bytes
  # A budget just under the full-batch step forces accumulation; the choice is the largest
  # size that fits, and the next larger size really did not fit.
  cfg, plan = plan_for_budget(dataclasses.replace(TINY, memory_budget=str(full - 1)))
  sizes = [b for b, _ in plan.tried]
  assert sizes == sorted(sizes, reverse=True) and sizes[0] == 16
  assert plan.microbatch_size < 16 and plan.microbatch_size * plan.num_microbatches == 16
  assert plan.predicted_bytes <= full - 1 < plan.tried[-2][1]
  assert cfg.accum.microbatch_size == plan.microbatch_size
  assert cfg.grad_accum_steps == plan.num_microbatches
  # Memory really falls with the micro-batch size (the planner's premise, measured).
  assert plan.tried[-1][1] < plan.tried[0][1]


@pytest.mark.slow  # ~16 s
def test_plan_errors():
  with pytest.raises(ConfigError, match='too small: even a micro-batch of 1'):
    plan_for_budget(dataclasses.replace(TINY, memory_budget='10KiB'))
  with pytest.raises(ConfigError, match='needs --tokens-per-update'):
    plan_for_budget(dataclasses.replace(TINY, tokens_per_update=None, grad_accum_steps=2))
