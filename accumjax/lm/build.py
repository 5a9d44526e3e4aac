"""What a run is built from its settings: the device mesh, the optimizer and its schedule, the
loss, and the memory planner's resolution of `--memory-budget`. No training loop here (train.py).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax

from accumjax import parallel
from accumjax.config import AccumConfig
from accumjax.core import ConfigError
from accumjax.layers import REMATS
from accumjax.lm import config as config_lib
from accumjax.lm.config import TrainConfig
from accumjax.lm.model import flops_per_token, live_set, make_lm, num_params
from accumjax.losses import token_cross_entropy
from accumjax.optim import accumulating_optimizer
from accumjax.planner import (
  TradePlan,
  compiled_memory,
  describe_plan,
  format_bytes,
  measure_rates,
  parse_bytes,
  plan_trade,
  time_model,
)
from accumjax.step import init_train_state, jit_train_step, make_train_step


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


def build_optimizer(cfg: TrainConfig, accum: AccumConfig):
  """(the accumulating optimizer, the learning-rate schedule) for a run."""
  schedule = lr_schedule(cfg)
  return accumulating_optimizer(inner_optimizer(cfg, schedule), accum), schedule


def make_loss_fn(apply):
  """The LM's loss in (sum, weight) form: token cross entropy over the unmasked targets."""

  def loss_fn(params, batch, rng):
    logits = apply(params, batch['inputs'], rng)
    return token_cross_entropy(logits, batch['targets'], batch['mask'])

  return loss_fn


def _step_bytes(cfg: TrainConfig, loss_fn, params, b: int, k: int, mesh=None) -> int:
  """XLA's compiled bytes (per device) of the train step(s) training would run with micro-batch
  b and K: the largest of its programs (interim and last call, in multisteps/hybrid modes).

  On a mesh with an fsdp axis the real sharded step is compiled for that mesh, so the state's
  shards, the params gathered for the call and the accumulator's policy are all counted. On a
  data-only mesh each device runs the one-device program on its rows (plus one reduction)."""
  fsdp = parallel.fsdp_size(mesh)
  devices = mesh.size if fsdp > 1 else 1
  c = config_lib.replace(cfg, batch_size=b, grad_accum_steps=k, tokens_per_update=None,
                         grad_accum_schedule=None)
  accum = config_lib.validate(c, devices)
  tx = build_optimizer(c, accum)[0]
  state = jax.eval_shape(lambda p: init_train_state(p, tx, 0, accum), params)
  rows = accum.per_call * b * devices
  batch = {'inputs': jax.ShapeDtypeStruct((rows, cfg.accum.seq_len), jnp.int32),
           'targets': jax.ShapeDtypeStruct((rows, cfg.accum.seq_len), jnp.int32),
           'mask': jax.ShapeDtypeStruct((rows, cfg.accum.seq_len), jnp.float32)}
  if fsdp > 1:
    state = parallel.abstract_state(state, mesh)
    sharding = parallel.batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
             for name, x in batch.items()}
  step = jit_train_step(make_train_step(loss_fn, tx, accum, mesh=mesh if fsdp > 1 else None))
  hints = (True,) if accum.calls_per_update == 1 else (False, True)
  return max(compiled_memory(step, state, batch, last_call=h)['total'] for h in hints)


def _time_model(cfg: TrainConfig, params, rates: dict):
  """The planner's stated time model for this LM: FLOPs per token (with remat's recompute) at
  the device's measured matmul rate, plus a measured fixed cost per micro-batch."""
  per_token = lambda remat: flops_per_token(cfg.model, params, cfg.accum.seq_len, remat)
  return time_model(per_token, cfg.accum.seq_len, rates)


def plan_for_budget(cfg: TrainConfig, mesh=None) -> tuple[TrainConfig, TradePlan]:
  """Resolves --memory-budget: the fastest (remat, micro-batch, K) whose compiled train step
  fits the budget per device (`planner.plan_trade`). With --tokens-per-update the micro-batch
  divides the update's rows and K follows; with a fixed K (--grad-accum-steps, a schedule or
  auto: their largest K) the micro-batch is the largest that fits and the time is compared per
  row. Returns the config with the micro-batch size, K and remat set.

  On a `mesh` of several devices the budget is per device: on a data-only mesh each device runs
  the one-device program on its share of the rows (plus one reduction per call); with an fsdp
  axis the sharded step is compiled for the mesh (each device holds 1/F of the state).
  """
  num_devices = 1 if mesh is None else mesh.size
  if cfg.tokens_per_update is not None and (
      cfg.tokens_per_update <= 0 or cfg.tokens_per_update % (cfg.accum.seq_len * num_devices)):
    raise ConfigError(f'--tokens-per-update {cfg.tokens_per_update} must be a positive multiple '
                      f'of --seq-len x devices = {cfg.accum.seq_len} x {num_devices}.')
  budget = parse_bytes(cfg.memory_budget)
  config_lib.validate(config_lib.replace(cfg, batch_size=1))
  rows = k = None
  if cfg.tokens_per_update is not None:
    rows = cfg.tokens_per_update // (cfg.accum.seq_len * num_devices)
  else:
    k = cfg.num_microbatches(num_devices)
  models = {remat: make_lm(dataclasses.replace(cfg.model, remat=remat), seed=cfg.seed,
                           abstract=True) for remat in REMATS}
  params = models['none'][1]
  seconds_of = _time_model(cfg, params, measure_rates(cfg.accum.compute_jnp_dtype))
  step_memory = lambda b, k, remat: _step_bytes(
      config_lib.replace(cfg, remat=remat), make_loss_fn(models[remat][0]), params, b, k, mesh)
  try:
    plan = plan_trade(step_memory, budget, seconds_of, REMATS, rows=rows, num_microbatches=k)
  except ConfigError as e:
    raise ConfigError(str(e).replace('budget_bytes=', '--memory-budget ', 1)) from None
  if rows is not None:
    cfg = config_lib.replace(cfg, grad_accum_steps=plan.num_microbatches, tokens_per_update=None)
  return config_lib.replace(cfg, batch_size=plan.microbatch_size, remat=plan.remat), plan


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


def plan_only(cfg: TrainConfig) -> list[tuple[str, str]]:
  """What `--plan-only` prints: with --memory-budget the plan and what it weighed; the
  micro-batch, K and tokens per update; the compiled memory of the step per device (XLA) and
  the live-set account (`state.live_bytes_per_device`). Nothing is trained or written."""
  mesh = make_mesh(cfg.mesh)
  rows = []
  if cfg.memory_budget is not None:
    cfg, plan = plan_for_budget(cfg, mesh)
    rows.append(('memory plan', describe_plan(plan)))
  devices = mesh.size
  accum = config_lib.validate(cfg, devices)
  apply, params = make_lm(cfg.model, seed=cfg.seed, abstract=True)
  fsdp = parallel.fsdp_size(mesh)
  compiled = _step_bytes(cfg, make_loss_fn(apply), params, accum.microbatch_size,
                         accum.num_microbatches, mesh)
  tx = build_optimizer(cfg, accum)[0]
  state = jax.eval_shape(lambda p: init_train_state(p, tx, 0, accum), params)
  if fsdp > 1:
    state = parallel.abstract_state(state, mesh)
  live = live_set(cfg.model, state, accum, fsdp)
  m = cfg.model
  rows += [
      ('model', f'{num_params(params):,} params, d_model '
                f'{m.d_model}, {m.num_layers} layers, {m.num_heads} heads, remat {m.remat}'),
      ('mesh', f'{dict(mesh.shape)}' + (f', fsdp gather {accum.fsdp_gather}' if fsdp > 1
                                        else '')),
      ('micro-batch x K', f'{accum.microbatch_size} x {accum.num_microbatches} per device, '
                          f'{accum.effective_batch * cfg.accum.seq_len:,} tokens per update'),
      ('compiled step (XLA)', f'{format_bytes(compiled)} per device'),
      ('live-set estimate', f'{format_bytes(live["total"])} per device: ' + ', '.join(
          f'{k} {format_bytes(v)}' for k, v in live.items() if k != 'total')),
  ]
  return rows
