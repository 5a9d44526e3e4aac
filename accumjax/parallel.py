"""Data parallelism on JAX's own runtime: a 1-D `data` mesh, one reduction per call.

The mesh is a `jax.sharding.Mesh` over every device of every process (`jax.distributed` joins
the processes; see experiments/train.py). Batches are sharded along `data` (each process
supplies the rows of its own devices), params and optimizer state are replicated
(`PartitionSpec()`: a later FSDP-style layout only has to change `state_sharding`).

`reduced_sums` is how the train step uses the mesh: inside `shard_map`, every device runs the
accumulation core (`core.scan_microbatches`, one `lax.scan`) over its own rows only, then a single
`psum` adds the devices' `GradSums` (gradient sums, loss sums, weights and non-finite counts
together, with the per-micro-batch non-finite flags). The
division by the global weight happens once, afterwards, in the optimizer wrapper, so the update
is the big-batch update whatever the devices' token counts. A plain `jit` over a sharded batch
instead lets XLA reduce the gradient inside the scan, once per micro-batch
(tests/test_parallel.py counts the all-reduces in both compiled programs with
`collective_counts`; the naive step lives in experiments/naive_dp.py).

Not here: choosing K or the micro-batch size (config.py), the call loop (loop.py).
"""

import functools
import re

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from accumjax import model_state as ms
from accumjax.core import ConfigError, scan_microbatches

DATA = 'data'


def make_mesh(data: int | None = None) -> Mesh:
  """A 1-D `data` mesh over all devices of all processes (process-major order).

  `data=N` with one process may take the first N devices (to compare device counts in one
  process); with several processes the mesh spans every device.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  n = len(devices) if data is None else data
  if isinstance(n, bool) or not isinstance(n, int) or not (
      1 <= n <= len(devices) and (n == len(devices) or jax.process_count() == 1)):
    raise ConfigError(
        f'--mesh data={data} needs {data} devices; this run has {len(devices)} '
        f'({jax.process_count()} process(es) x {jax.local_device_count()} local devices). '
        f'Allowed: data={len(devices)} or auto' + (
            f', or any N from 1 to {len(devices)}' if jax.process_count() == 1 else '') +
        '. More CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N.')
  return Mesh(np.array(devices[:n]), (DATA,))


def state_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA))


def replicate(tree, mesh: Mesh):
  """Global, fully replicated arrays from values that every process holds identically (host
  arrays, single-device arrays, or global arrays that are already replicated)."""
  sharding = state_sharding(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def abstract_replicated(tree, mesh: Mesh):
  """ShapeDtypeStructs of `tree`, replicated on `mesh` (a checkpoint restore target)."""
  sharding = state_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def shard_batch(local_batch, mesh: Mesh):
  """One global batch from this process's rows (its devices' slice of the global batch)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def process_rows(global_rows: int) -> tuple[int, int]:
  """(start, stop) of this process's rows in a global batch of `global_rows`."""
  count, index = jax.process_count(), jax.process_index()
  if global_rows % count:
    raise ConfigError(f'a batch of {global_rows} rows does not split over {count} processes.')
  per = global_rows // count
  return index * per, (index + 1) * per


def reduced_sums(loss_fn, mesh: Mesh, reduction: str = 'psum', state_rules=None,
                 **accumulate_kwargs):
  """`(params, batch, rng_data, index_offset, num_microbatches, loss_scale, model_state,
  state_acc) -> (GradSums, bad, call_acc)`.

  Each device scans `num_microbatches` micro-batches of its own rows with the one core
  (`core.scan_microbatches`) and the devices' sums meet in one reduction: `psum`, or for
  'ordered' one all-gather added in device order. `bad` (bool[num_microbatches]) marks the
  micro-batch positions that were non-finite on any device; it travels in the same
  reduction, and so does `GradSums.nonfinite` (a count over devices). Dropout keys are folded
  with the device index, so devices differ. `loss_scale` is None or a replicated scalar.
  With a model state (see `accumjax.model_state`; None otherwise), every device starts from
  `ms.restart(state_acc)` and the devices' accumulators meet in `ms.reduce_devices` (psum, and
  pmax for 'max' leaves, also under 'ordered'); `call_acc` is the call's, to be merged.
  """

  def local(params, batch, rng_data, index_offset, loss_scale, model_state, state_acc,
            num_microbatches):
    rng = None
    if rng_data is not None:
      rng = jax.random.fold_in(jax.random.wrap_key_data(rng_data), jax.lax.axis_index(DATA))
    start_acc = None if model_state is None else ms.restart(state_acc, state_rules)
    sums, _, bad, call_acc = scan_microbatches(
        loss_fn, params, batch, num_microbatches=num_microbatches, rng=rng,
        index_offset=index_offset, loss_scale=loss_scale, model_state=model_state,
        state_rules=state_rules, state_acc=start_acc, **accumulate_kwargs)
    if call_acc is not None:
      call_acc = ms.reduce_devices(call_acc, state_rules, DATA)
    out = (sums, bad.astype(jnp.float32))
    if reduction == 'psum':
      sums, bad = jax.lax.psum(out, DATA)
    else:
      # 'ordered': every device gathers all devices' sums and adds them in device order, so
      # the result is bitwise the same however the devices are spread over processes.
      # One flat vector, so it is one collective, not one per leaf.
      flat, unravel = jax.flatten_util.ravel_pytree(out)
      gathered = jax.lax.all_gather(flat, DATA)
      sums, bad = unravel(functools.reduce(jnp.add, list(gathered)))
    return sums, bad > 0, call_acc

  def run(params, batch, rng_data, index_offset, num_microbatches, loss_scale=None,
          model_state=None, state_acc=None):
    fn = jax.shard_map(
        lambda p, b, r, o, s, m, a: local(p, b, r, o, s, m, a, num_microbatches), mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(DATA), PartitionSpec(), PartitionSpec(),
                  PartitionSpec(), PartitionSpec(), PartitionSpec()),
        # The core's zero-initialised scan carry is device-invariant while the per-device sums
        # vary; the core stays mesh-agnostic, and the reduction makes the output invariant.
        out_specs=PartitionSpec(), check_vma=False)
    return fn(params, batch, rng_data, index_offset, loss_scale, model_state, state_acc)

  return run


_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.-]+) .*\{$')
_CALLED = re.compile(r'(?:body|condition|calls|to_apply|branch_computations)=\{?([^,}\s]+'
                     r'(?:, *%[\w.-]+)*)\}?')
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def collective_counts(hlo_text: str) -> dict:
  """Cross-device collectives in a compiled HLO module, inside vs outside while-loop bodies.

  Returns {op: {'in_loop': n, 'outside': m}} for the collectives present (an async pair
  `all-reduce-start`/`-done` counts once). Loop bodies include what they call.
  """
  computations, name = {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      name = match.group(1)
      computations[name] = []
    elif name is not None and line.strip() and line.strip() != '}':
      computations[name].append(line)

  def called(lines):
    return {c.strip().lstrip('%') for line in lines for group in _CALLED.findall(line)
            for c in group.split(',')}

  in_loop = set()
  frontier = [b.lstrip('%') for lines in computations.values() for line in lines
              for b in re.findall(r'body=(%?[\w.-]+)', line)]
  while frontier:
    c = frontier.pop()
    if c in computations and c not in in_loop:
      in_loop.add(c)
      frontier.extend(called(computations[c]))
  counts = {}
  for c, lines in computations.items():
    for line in lines:
      for op in _COLLECTIVES:
        if re.search(rf'\s{op}(?:-start)?\(', line):
          where = 'in_loop' if c in in_loop else 'outside'
          counts.setdefault(op, {'in_loop': 0, 'outside': 0})[where] += 1
  return counts
