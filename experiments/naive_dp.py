"""The naive data-parallel comparator for benchmarks and tests: no shard_map.

`plain_jit_step` is the one-device train step under a plain `jit` over the mesh: same global
batch and update as `make_train_step(..., mesh=mesh)`, but written the way one would without
shard_map: micro-batches of `microbatch_size x num_devices` rows constrained to be sharded
along `data`, state replicated, and XLA's partitioner left to place the reduction. It puts an
all-reduce inside the scan's loop body (once per micro-batch), which
`experiments.hlo.collective_counts` shows (tests/test_parallel.py, experiments.bench_dp).
"""

import dataclasses

import jax
from jax.sharding import Mesh

from accumjax import parallel
from accumjax.step import make_train_step


def plain_jit_step(loss_fn, tx, config, mesh: Mesh):
  """The jitted naive step: `(state, batch, last_call=True) -> (state, metrics)`."""

  def sharded_loss(params, microbatch, rng):
    microbatch = jax.lax.with_sharding_constraint(microbatch, parallel.batch_sharding(mesh))
    return loss_fn(params, microbatch, rng)

  one_device = dataclasses.replace(
      config, microbatch_size=config.microbatch_size * config.num_devices, num_devices=1)
  train_step = make_train_step(sharded_loss, tx, one_device)
  shardings = dict(in_shardings=(parallel.state_sharding(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=parallel.state_sharding(mesh))
  # One program per value of last_call (jit takes no keyword arguments with in_shardings).
  jitted = {last: jax.jit(lambda state, batch, last=last: train_step(state, batch, last),
                          donate_argnums=0, **shardings) for last in (False, True)}

  def step(state, batch, last_call=True):
    return jitted[bool(last_call)](state, batch)

  step.lower = lambda state, batch, last_call=True: jitted[bool(last_call)].lower(state, batch)
  return step
