"""Data parallelism and sharded state on JAX's own runtime: a `data` x `fsdp` mesh, one
reduction per call.

The mesh is a `jax.sharding.Mesh` over every device of every process (`jax.distributed` joins
the processes; see experiments/train.py). Batches are sharded along both axes (each process
supplies the rows of its own devices); params, optimizer state and the cycle's gradient sums
are replicated over `data` and split over `fsdp` (`state_shardings`).

`reduced_sums` is how the train step uses the mesh: inside `shard_map`, every device runs the
accumulation core (`core.scan_microbatches`, one `lax.scan`) over its own rows only, then a single
`psum` adds the devices' `GradSums` (gradient sums, loss sums, weights and non-finite counts
together, with the per-micro-batch non-finite flags). The
division by the global weight happens once, afterwards, in the optimizer wrapper, so the update
is the big-batch update whatever the devices' token counts. A plain `jit` over a sharded batch
instead lets XLA reduce the gradient inside the scan, once per micro-batch
(tests/test_parallel.py counts the all-reduces in both compiled programs; the naive step
lives in experiments/naive_dp.py).

Not here: choosing K or the micro-batch size (config.py), the call loop (loop.py).
"""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from accumjax import model_state as ms
from accumjax.config import FSDP_GATHERS, FSDP_REDUCES
from accumjax.core import ConfigError, GradSums, NoiseSums, scan_microbatches
from accumjax.precision import cast_floats
from accumjax.state import Cycle, TrainState

DATA = 'data'
FSDP = 'fsdp'
AXES = (DATA, FSDP)


def make_mesh(data: int | None = None, fsdp: int = 1) -> Mesh:
  """A `data` x `fsdp` mesh over all devices of all processes (process-major order, `fsdp`
  the inner axis: with fsdp=F, F consecutive devices hold one copy of the state between them).

  `data` None: all devices / fsdp. With one process, data x fsdp may take the first devices
  (to compare device counts in one process); with several the mesh spans every device.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  total = len(devices)
  if isinstance(fsdp, bool) or not isinstance(fsdp, int) or not 1 <= fsdp <= total or (
      data is None and total % fsdp):
    raise ConfigError(
        f'make_mesh(fsdp={fsdp!r}): fsdp must be an int from 1 to {total} dividing the device '
        f'count '
        f'({total}), allowed: {[f for f in range(1, total + 1) if total % f == 0]}.')
  n = total // fsdp if data is None else data
  if isinstance(n, bool) or not isinstance(n, int) or not (
      1 <= n * fsdp <= total and (n * fsdp == total or jax.process_count() == 1)):
    spec = f'data={data}' + (f',fsdp={fsdp}' if fsdp > 1 else '')
    raise ConfigError(
        f'make_mesh({spec}) needs {n * fsdp if isinstance(n, int) else n} devices; this run has '
        f'{total} '
        f'({jax.process_count()} process(es) x {jax.local_device_count()} local devices). '
        f'Allowed: data x fsdp = {total}' + (
            f', or any product from 1 to {total}' if jax.process_count() == 1 else '') +
        '. More CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N.')
  return Mesh(np.array(devices[:n * fsdp]).reshape(n, fsdp), AXES)


def fsdp_size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else dict(mesh.shape).get(FSDP, 1)


def leaf_spec(shape, fsdp: int) -> PartitionSpec:
  """The FSDP layout of one array: its largest dimension that `fsdp` divides is split over the
  `fsdp` axis (the first such on a tie); replicated when none does (scalars, odd sizes)."""
  dims = [i for i, n in enumerate(shape) if fsdp > 1 and n >= fsdp and n % fsdp == 0]
  if not dims:
    return PartitionSpec()
  dim = max(dims, key=lambda i: (shape[i], -i))
  return PartitionSpec(*([None] * dim), FSDP)


def tree_specs(tree, fsdp: int):
  """`leaf_spec` of every array of `tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: leaf_spec(np.shape(x), fsdp), tree)


def state_shardings(state, mesh: Mesh):
  """Shardings of a TrainState (or a `Cycle`) on `mesh`: params, the optimizer state and the
  cycle's gradient sums in the FSDP layout of `leaf_spec`, everything else replicated. With
  fsdp=1 all replicated (plain data parallel). A leaf in host memory
  (`AccumConfig.accumulator_memory`) stays there."""
  f = fsdp_size(mesh)
  shard = lambda tree: jax.tree.map(
      lambda x, spec: NamedSharding(mesh, spec, memory_kind=_host_kind(x)), tree,
      tree_specs(tree, f))
  rep = lambda tree: jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)
  shard_cycle = lambda cycle: None if cycle is None else rep(cycle)._replace(
      sums=rep(cycle.sums)._replace(grads=shard(cycle.sums.grads)))
  if isinstance(state, Cycle):
    return shard_cycle(state)
  if not isinstance(state, TrainState):
    return shard(state)
  return rep(state)._replace(params=shard(state.params), opt_state=shard(state.opt_state),
                             cycle=shard_cycle(state.cycle))


def _host_kind(x) -> str | None:
  """'pinned_host' for an array placed in host memory, else None (the default memory)."""
  sharding = getattr(x, 'sharding', None)
  kind = getattr(sharding, 'memory_kind', None)
  return kind if kind in ('pinned_host', 'unpinned_host') else None


def place_state(state, mesh: Mesh):
  """The state as global arrays laid out by `state_shardings` (from values every process
  holds identically, or global arrays on any mesh: those are resharded)."""
  return jax.tree.map(_put, state, state_shardings(state, mesh))


def abstract_state(state, mesh: Mesh):
  """ShapeDtypeStructs of `state` laid out by `state_shardings` (a checkpoint restore target:
  Orbax reads each device's shard, whatever mesh the checkpoint was written from)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      state, state_shardings(state, mesh))


def constrain_state(state, mesh: Mesh):
  """Inside jit: pins the new state to `state_shardings` (so an FSDP step's outputs stay
  sharded whatever XLA's propagation would pick)."""
  return jax.lax.with_sharding_constraint(state, state_shardings(state, mesh))


def state_sharding(mesh: Mesh) -> NamedSharding:
  """Replicated on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over every device of the mesh (both axes), in the mesh's device order."""
  return NamedSharding(mesh, PartitionSpec(AXES))


def _put(x, sharding):
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda y: y, out_shardings=sharding)(x)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree, mesh: Mesh):
  """Global, fully replicated arrays from values that every process holds identically (host
  arrays, single-device arrays, or global arrays that are already replicated)."""
  sharding = state_sharding(mesh)
  return jax.tree.map(lambda x: _put(x, sharding), tree)


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


def _sharded_dim(spec: PartitionSpec) -> int | None:
  return tuple(spec).index(FSDP) if FSDP in tuple(spec) else None


def _by_dtype(leaves, dims):
  """{dtype: [(leaf index, sharded dim)]} of the sharded leaves (one collective per dtype)."""
  groups = {}
  for i, (x, d) in enumerate(zip(leaves, dims, strict=True)):
    if d is not None:
      groups.setdefault(jnp.dtype(x.dtype), []).append((i, d))
  return groups


def gather_fsdp(tree, specs, f: int):
  """Inside `shard_map`: the full arrays from each device's shards (`specs`: `tree_specs` of
  the global arrays), as one all-gather over `fsdp` per dtype. Each shard is laid out with its
  split dimension first and flattened, the shards concatenated, gathered, and cut back."""
  leaves, treedef = jax.tree.flatten(tree)
  dims = [_sharded_dim(s) for s in treedef.flatten_up_to(specs)]
  out = list(leaves)
  for items in _by_dtype(leaves, dims).values():
    flat = jnp.concatenate([jnp.moveaxis(leaves[i], d, 0).reshape(-1) for i, d in items])
    gathered = jax.lax.all_gather(flat, FSDP, axis=0)  # [f, shard elements]
    offset = 0
    for i, d in items:
      x = leaves[i]
      moved = jnp.moveaxis(x, d, 0).shape
      piece = gathered[:, offset:offset + x.size].reshape((f * moved[0],) + moved[1:])
      out[i] = jnp.moveaxis(piece, 0, d)
      offset += x.size
  return treedef.unflatten(out)


def reduce_scatter_fsdp(tree, specs, f: int):
  """Inside `shard_map`: every sharded leaf (full size, this device's sums) summed over the
  `fsdp` axis, this device keeping only its shard; one reduce-scatter per dtype. Leaves the
  layout replicates are returned as they are (the caller sums them with the scalars)."""
  leaves, treedef = jax.tree.flatten(tree)
  dims = [_sharded_dim(s) for s in treedef.flatten_up_to(specs)]
  out = list(leaves)
  for items in _by_dtype(leaves, dims).values():
    rows = jnp.concatenate([jnp.moveaxis(leaves[i], d, 0).reshape(f, -1) for i, d in items],
                           axis=1)
    mine = jax.lax.psum_scatter(rows, FSDP, scatter_dimension=0, tiled=True)[0]
    offset = 0
    for i, d in items:
      moved = jnp.moveaxis(leaves[i], d, 0).shape
      size = leaves[i].size // f
      piece = mine[offset:offset + size].reshape((moved[0] // f,) + moved[1:])
      out[i] = jnp.moveaxis(piece, 0, d)
      offset += size
  return treedef.unflatten(out)


def _reduce_sharded(sums: GradSums, bad, specs, data: int):
  """Inside `shard_map` on an fsdp mesh: each device's gradient shards summed over `data` (one
  all-reduce, if data > 1), the scalars, flags and replicated leaves over every device (one)."""
  sharded = jax.tree.map(lambda s: _sharded_dim(s) is not None, specs)
  pick = lambda keep: jax.tree.map(lambda g, s: g if s == keep else None, sums.grads, sharded)
  shards, rest = pick(True), pick(False)
  if data > 1:
    shards = jax.lax.psum(shards, DATA)
  (sums, rest), bad = jax.lax.psum(((sums._replace(grads=None), rest), bad.astype(jnp.float32)),
                                   AXES)
  grads = jax.tree.map(lambda s, a, b: a if s else b, sharded, shards, rest,
                       is_leaf=lambda x: x is None)
  return sums._replace(grads=grads), bad


def _reduce_replicated(sums: GradSums, bad, reduction: str):
  """Inside `shard_map` with replicated params: the devices' sums and flags added, in one
  collective ('psum'; 'ordered': an all-gather added in device order, bitwise the same however
  the devices are spread over processes)."""
  out = (sums, bad.astype(jnp.float32))
  if reduction == 'psum':
    return jax.lax.psum(out, AXES)
  flat, unravel = jax.flatten_util.ravel_pytree(out)  # one vector: one collective
  gathered = jax.lax.all_gather(flat, AXES)
  return unravel(functools.reduce(jnp.add, list(gathered)))


def reduced_sums(loss_fn, mesh: Mesh, reduction: str = 'psum', state_rules=None,
                 fsdp_reduce: str = 'call', fsdp_gather: str = 'call', compute_dtype=None,
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
  `compute_dtype`: the params are cast to it before anything is gathered (half the bytes
  under bfloat16; the gradient with respect to the float32 params is the same).

  On a mesh with fsdp=F > 1 the params come in sharded (`tree_specs`) and the gradient sums go
  out sharded the same way, gathered as `fsdp_gather` says:

  - 'call': each device all-gathers the params once per call (one collective before the scan;
    the full params live for the call) and its micro-batches' gradients are reduce-scattered
    over `fsdp` into its shard: `fsdp_reduce='call'` once, after the scan (the scan carry is
    full size), `'microbatch'` inside the scan after every micro-batch (the carry is a shard).
    Then the shards are summed over `data` (one all-reduce, if data > 1) and the scalars,
    flags and replicated leaves over every device (one all-reduce).
  - 'layer': `shard_map` is manual over `data` only; JAX's partitioner handles `fsdp`. A
    micro-batch is the fsdp group's rows (the j-th chunk of every device's rows), the carry
    is constrained to the shards, and a model that scans its layers through
    `layers.scan_layers` gathers one layer at a time (again in the backward pass) and
    reduce-scatters each layer's gradient as it is produced. `fsdp_reduce` does not apply.
    Then one all-reduce over `data` adds the groups' sums (if data > 1).
  """
  f = fsdp_size(mesh)
  if f > 1 and reduction != 'psum':
    raise ConfigError(f"dp_reduction={reduction!r} is not available with fsdp={f}; allowed: "
                      "'psum'.")
  if fsdp_reduce not in FSDP_REDUCES:
    raise ConfigError(f'fsdp_reduce={fsdp_reduce!r}; allowed: {", ".join(FSDP_REDUCES)}.')
  if fsdp_gather not in FSDP_GATHERS:
    raise ConfigError(f'fsdp_gather={fsdp_gather!r}; allowed: {", ".join(FSDP_GATHERS)}.')
  cast = (lambda p: p) if compute_dtype is None else (lambda p: cast_floats(p, compute_dtype))
  if f > 1 and fsdp_gather == 'layer':
    return _layer_sums(loss_fn, mesh, cast, state_rules, accumulate_kwargs)
  data = dict(mesh.shape)[DATA]

  def local(params, batch, rng_data, index_offset, loss_scale, model_state, state_acc,
            num_microbatches, specs):
    rng, start_acc = _start(rng_data, AXES, model_state, state_acc, state_rules)
    fsdp_kwargs = {}
    params = cast(params)
    if f > 1:
      shards, params = params, gather_fsdp(params, specs, f)
      if fsdp_reduce == 'microbatch':
        fsdp_kwargs = dict(reduce_microbatch=lambda g: reduce_scatter_fsdp(g, specs, f),
                           sums_like=shards)
    sums, _, bad, call_acc = scan_microbatches(
        loss_fn, params, batch, num_microbatches=num_microbatches, rng=rng,
        index_offset=index_offset, loss_scale=loss_scale, model_state=model_state,
        state_rules=state_rules, state_acc=start_acc, **fsdp_kwargs, **accumulate_kwargs)
    if call_acc is not None:
      call_acc = ms.reduce_devices(call_acc, state_rules, AXES)
    if f > 1:
      if fsdp_reduce == 'call':
        sums = sums._replace(grads=reduce_scatter_fsdp(sums.grads, specs, f))
      sums, bad = _reduce_sharded(sums, bad, specs, data)
    else:
      sums, bad = _reduce_replicated(sums, bad, reduction)
    return sums, bad > 0, call_acc

  # The core's zero-initialised scan carry is device-invariant while the per-device sums vary;
  # the core stays mesh-agnostic, and the reduction makes the output invariant (check_vma off).
  return _mapped(local, mesh, f, accumulate_kwargs, manual=AXES)


def _start(rng_data, axes, model_state, state_acc, state_rules):
  """Inside `shard_map`: this device's dropout key (folded with its index over `axes`: devices,
  or data replicas under the 'layer' gather) and its model-state accumulator to start from."""
  rng = None
  if rng_data is not None:
    rng = jax.random.fold_in(jax.random.wrap_key_data(rng_data), jax.lax.axis_index(axes))
  return rng, None if model_state is None else ms.restart(state_acc, state_rules)


def _mapped(local, mesh: Mesh, f: int, accumulate_kwargs, manual):
  """`run(params, batch, rng_data, index_offset, num_microbatches, loss_scale=None,
  model_state=None, state_acc=None)`: `local` in a `shard_map` over the `manual` mesh axes (all
  of them, or `data` alone with `fsdp` left to the partitioner). The params come in by their
  FSDP layout; under a manual `fsdp` axis each device sees its shards."""
  rep = PartitionSpec()

  def run(params, batch, rng_data, index_offset, num_microbatches, loss_scale=None,
          model_state=None, state_acc=None):
    specs = tree_specs(params, f)
    manual_specs = specs if FSDP in manual else jax.tree.map(lambda _: rep, specs)
    fn = jax.shard_map(
        lambda p, b, r, o, s, m, a: local(p, b, r, o, s, m, a, num_microbatches, specs),
        mesh=mesh, axis_names=set(manual),
        in_specs=(manual_specs, PartitionSpec(manual), rep, rep, rep, rep, rep),
        out_specs=(_sums_specs(manual_specs, accumulate_kwargs), rep, rep), check_vma=False)
    return fn(params, batch, rng_data, index_offset, loss_scale, model_state, state_acc)

  return run


def _sums_specs(grad_specs, accumulate_kwargs) -> GradSums:
  rep = PartitionSpec()
  noise = accumulate_kwargs.get('noise_stats')
  return GradSums(grad_specs, rep, rep, rep, NoiseSums(rep, rep) if noise else None)


def _layer_sums(loss_fn, mesh: Mesh, cast, state_rules, accumulate_kwargs):
  """`reduced_sums` under the 'layer' gather: manual over `data`, `fsdp` left to the
  partitioner (see `layers.scan_layers` for what the model does with it)."""
  f, data = fsdp_size(mesh), dict(mesh.shape)[DATA]

  def local(params, batch, rng_data, index_offset, loss_scale, model_state, state_acc,
            num_microbatches, specs):
    rng, start_acc = _start(rng_data, DATA, model_state, state_acc, state_rules)
    keep_shards = lambda g: jax.lax.with_sharding_constraint(g, specs)
    sums, _, bad, call_acc = scan_microbatches(
        loss_fn, cast(params), batch, num_microbatches=num_microbatches, rng=rng,
        index_offset=index_offset, loss_scale=loss_scale, model_state=model_state,
        state_rules=state_rules, state_acc=start_acc, reduce_microbatch=keep_shards,
        sums_like=params, row_groups=f, **accumulate_kwargs)
    sums, bad = sums._replace(grads=keep_shards(sums.grads)), bad.astype(jnp.float32)
    if data > 1:  # (a collective over a manual axis of size 1 fails to compile in jax 0.10.2)
      sums, bad = jax.lax.psum((sums, bad), DATA)
      if call_acc is not None:
        call_acc = ms.reduce_devices(call_acc, state_rules, DATA)
    return sums, bad > 0, call_acc

  return _mapped(local, mesh, f, accumulate_kwargs, manual=(DATA,))
