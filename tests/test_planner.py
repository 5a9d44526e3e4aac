"""The planner: the fastest (remat, micro-batch, K) whose compiled step fits, from a linear fit
of XLA's accounting at two micro-batch sizes per remat policy and a stated time model."""

import dataclasses

import pytest

from accumjax import planner
from accumjax.core import ConfigError
from accumjax.lm import config as config_lib
from accumjax.lm.build import _step_bytes, make_loss_fn, plan_for_budget
from accumjax.lm.model import make_lm
from experiments import train
from tests.helpers import train_config

TINY = train_config(seq_len=32, d_model=32, num_layers=2, num_heads=2, max_len=64,
                    tokens_per_update=32 * 16, memory_budget='1GiB')
MiB = 2 ** 20


def test_parse_bytes():
  assert planner.parse_bytes('2GiB') == 2 * 2**30
  assert planner.parse_bytes('512MiB') == 512 * 2**20
  assert planner.parse_bytes('1.5GB') == 1_500_000_000
  assert planner.parse_bytes('1000') == 1000
  for bad in ('lots', '-1GiB', '2 parsecs', '0'):
    with pytest.raises(ConfigError, match='memory size'):
      planner.parse_bytes(bad)


# Synthetic: memory = fixed + per row x b; remat trades memory per row for recompute.
FIXED, PER_ROW = 100 * MiB, {'none': 40 * MiB, 'dots': 20 * MiB, 'full': 4 * MiB}
SLOWER = {'none': 1.0, 'dots': 1.05, 'full': 1.33}


def _memory(b, k, remat):
  del k
  return FIXED + PER_ROW[remat] * b


def _seconds(b, k, remat, per_microbatch=0.5):
  return k * per_microbatch + b * k * SLOWER[remat] * 0.1


def test_plan_trade_picks_the_fastest_plan_that_fits():
  plan = planner.plan_trade(_memory, 500 * MiB, _seconds, ('none', 'dots', 'full'), rows=64)
  # none fits b=8 (K=8: 4 + 6.4 s), dots b=16 (K=4: 2 + 6.72 s), full b=64 (K=1: 0.5 + 8.51 s)
  assert (plan.remat, plan.microbatch_size, plan.num_microbatches) == ('dots', 16, 4)
  assert plan.compiled_bytes == plan.predicted_bytes <= 500 * MiB
  assert plan.compiles == 7  # 2 per policy, 1 to check the choice
  verdicts = {(c.remat, c.microbatch_size): c.verdict for c in plan.candidates}
  assert verdicts[('none', 16)].startswith('over budget')
  assert verdicts[('dots', 32)].startswith('over budget')
  assert verdicts[('none', 8)].startswith('fits, not faster')
  assert verdicts[('full', 64)].startswith('fits, not faster: 9.01 s')
  assert plan.fits['dots'] == [FIXED, 20 * MiB]
  # with no per-micro-batch cost, recompute no longer pays: the cheapest FLOPs that fit win
  plan = planner.plan_trade(_memory, 500 * MiB, lambda b, k, r: _seconds(b, k, r, 0.0),
                            ('none', 'dots', 'full'), rows=64)
  assert (plan.remat, plan.microbatch_size) == ('none', 8)


def test_plan_trade_steps_down_when_the_check_compile_disagrees():
  memory = lambda b, k, remat: _memory(b, k, remat) + (150 * MiB if b == 8 else 0)
  plan = planner.plan_trade(memory, 500 * MiB, lambda b, k, r: _seconds(b, k, r, 0.0),
                            ('none',), rows=64)
  assert (plan.microbatch_size, plan.num_microbatches) == (4, 16)
  assert any(c.verdict.startswith('compiled') and c.microbatch_size == 8
             for c in plan.candidates)


def test_plan_trade_with_a_fixed_k_takes_the_largest_microbatch():
  plan = planner.plan_trade(_memory, 500 * MiB, _seconds, ('none',), num_microbatches=8)
  assert (plan.microbatch_size, plan.num_microbatches) == (10, 8)
  with pytest.raises(ConfigError, match='budget_bytes=100.00 MiB is too small'):
    planner.plan_trade(_memory, 100 * MiB, _seconds, ('none', 'full'), rows=64)
  with pytest.raises(ConfigError, match='one of rows= or num_microbatches='):
    planner.plan_trade(_memory, 100 * MiB, _seconds, ('none',))


def test_flops_model_counts_remat_recompute():
  none = planner.transformer_flops_per_token(1000, 2, 8, 16, 'none')
  assert none == 6 * 1000 + 12 * 2 * 8 * 16
  assert planner.transformer_flops_per_token(1000, 2, 8, 16, 'dots') == none
  assert planner.transformer_flops_per_token(1000, 2, 8, 16, 'full') == none * 4 / 3


def _tiny_bytes(remat, b, k):
  apply, params = make_lm(dataclasses.replace(TINY.model, remat=remat), abstract=True)
  return _step_bytes(config_lib.replace(TINY, remat=remat), make_loss_fn(apply), params, b, k)


@pytest.mark.slow  # ~50 s: 10 compiles of the LM's step
def test_lm_plan_fits_its_prediction_and_the_next_size_up_does_not():
  one, two = _tiny_bytes('none', 1, 16), _tiny_bytes('none', 2, 8)
  budget = int(one + (two - one) * 5)  # between b = 4 and b = 8 for remat none
  cfg, plan = plan_for_budget(dataclasses.replace(TINY, memory_budget=str(budget)))
  assert plan.compiled_bytes <= budget
  assert abs(plan.compiled_bytes - plan.predicted_bytes) <= 0.1 * plan.compiled_bytes
  assert (cfg.accum.microbatch_size, cfg.grad_accum_steps, cfg.model.remat) == (
      plan.microbatch_size, plan.num_microbatches, plan.remat)
  sizes = [b for b in range(1, 17) if 16 % b == 0]
  up = sizes[sizes.index(plan.microbatch_size) + 1]
  assert _tiny_bytes(plan.remat, up, 16 // up) > budget


@pytest.mark.slow  # ~30 s
def test_memory_budget_plans_a_k_schedule_for_its_largest_k():
  scheduled = dataclasses.replace(TINY, tokens_per_update=None, grad_accum_schedule='0:2,5:4')
  cfg, plan = plan_for_budget(dataclasses.replace(scheduled, memory_budget='64MiB'))
  assert plan.num_microbatches == 4 and plan.compiled_bytes <= 64 * MiB
  assert cfg.grad_accum_schedule == '0:2,5:4' and cfg.accum.microbatch_size == plan.microbatch_size


def test_preset_and_plan_only(capsys):
  args = ['--preset', '85m', '--d-model', '32', '--layers', '1', '--heads', '2', '--seq-len',
          '32', '--max-len', '32', '--tokens-per-update', '1024', '--plan-only']
  assert train.main(args) == 0
  out = capsys.readouterr().out
  assert 'compiled step (XLA)' in out and 'live-set estimate' in out
  assert 'd_model 32, 1 layers' in out  # the flags given win over the preset
  assert '8 x 4 per device, 1,024 tokens per update' in out  # the preset's batch 8, K 4
  cfg = train.config_from_args(train.parse_args(['--preset', '1.2b']))
  assert (cfg.model.d_model, cfg.model.num_layers, cfg.accum.compute_dtype) == (
      2048, 24, 'bfloat16')
