"""Layers stacked under one `lax.scan`: a per-layer FSDP gather and rematerialisation.

`scan_layers(fn, x, stacked)` runs `x = fn(layer_params, x)` once per layer over params
stacked on a leading layer axis (built e.g. with `nnx.vmap`). The loop compiles one layer, not
L, and gives the two memory levers of a deep model one place to act:

- **Per-layer gather.** Under `AccumConfig.fsdp_gather='layer'` the train step runs the model
  with the params sharded over the mesh's `fsdp` axis and leaves that axis to JAX's partitioner
  (see `parallel.reduced_sums`). Here each layer's slice is then constrained whole
  (`with_sharding_constraint`: XLA all-gathers it, in the compute dtype, inside the loop) and
  its gradient constrained back to the slice's shard in float32 (XLA reduce-scatters it inside
  the backward loop, as it is produced). The gathered layer is never saved for the backward
  pass: it is gathered again there. So no full-size param or gradient buffer exists. The
  activations are kept split by rows (their leading axis) over `fsdp`. Anywhere else (one
  device, a replicated mesh, the 'call' gather) nothing is constrained.
- **Remat** (`remat`, one of `REMATS`): what each layer saves for the backward pass.
  'none' saves every intermediate (except a gathered layer), 'dots' only the matmul outputs
  (`jax.checkpoint_policies.dots_saveable`), 'full' nothing but the layer's input (the layer is
  recomputed in the backward pass: about a third more FLOPs). The numbers are the same under
  each; only memory and time change.

Your own model gets both by scanning its layers through this function (docs/scale.md).
"""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from accumjax.errors import ConfigError
from accumjax.parallel import leaf_spec

__all__ = ['REMATS', 'remat_policy', 'saved_activation_bytes', 'scan_layers']

REMATS = ('none', 'dots', 'full')
FSDP = 'fsdp'
GATHERED = 'accumjax_gathered_layer'
# What a gathered layer passes through: the sharding constraint, inside the custom VJP of
# `_gathered`.
_NEVER_SAVED = ('sharding_constraint', 'custom_vjp_call', 'custom_vjp_call_jaxpr')
_BASE_POLICIES = {'none': None, 'dots': jax.checkpoint_policies.dots_saveable,
                  'full': jax.checkpoint_policies.nothing_saveable}


def check_remat(remat) -> str:
  if remat not in REMATS:
    raise ConfigError(f'remat={remat!r}; allowed: {", ".join(REMATS)}.')
  return remat


def remat_policy(remat: str):
  """The `jax.checkpoint` policy of `remat`, which never saves a gathered layer or a sharding
  constraint's output (their inputs are saved instead: a shard, not a whole layer).

  Written out because `jax.checkpoint_policies.save_anything_except_these_names` of jax 0.10.2
  saves everything, names included (measured: it kept every gathered layer, 4.8 GB at 1.2B)."""
  base = _BASE_POLICIES[check_remat(remat)]

  def policy(prim, *args, **params):
    if prim.name in _NEVER_SAVED or (prim.name == 'name' and params.get('name') == GATHERED):
      return False
    return True if base is None else base(prim, *args, **params)

  return policy


def fsdp_auto_size() -> int:
  """The size of the current mesh's `fsdp` axis when JAX's partitioner handles it (the 'layer'
  gather), else 1 (no mesh, no such axis, or an axis in manual `shard_map` mode)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or FSDP not in mesh.axis_names or FSDP not in mesh.auto_axes:
    return 1
  return dict(mesh.shape)[FSDP]


def _slice_spec(stacked_shape, f: int) -> PartitionSpec:
  """The shard layout of one layer's slice: the stacked leaf's (`parallel.leaf_spec`) without
  its layer axis; replicated when the layout splits the layer axis itself."""
  spec = tuple(leaf_spec(stacked_shape, f))
  if spec and spec[0] == FSDP:
    return PartitionSpec()
  return PartitionSpec(*spec[1:])


def _gathered(layer, specs):
  """The layer's params whole on every `fsdp` device (an all-gather in their own dtype, the
  compute dtype); the gradient's transpose: the float32 sum over `fsdp`, split back to the
  slice's shard (a reduce-scatter), then in the params' dtype."""

  @jax.custom_vjp
  def gather(tree):
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: PartitionSpec(), tree))

  def forward(tree):
    return gather(tree), None

  def backward(_, grads):
    summed = jax.tree.map(lambda g, s: jax.lax.with_sharding_constraint(
        g.astype(jnp.float32), s), grads, specs)
    return (jax.tree.map(lambda s, g: s.astype(g.dtype), summed, grads),)

  gather.defvjp(forward, backward)
  return jax.tree.map(lambda x: checkpoint_name(x, GATHERED), gather(layer))


def scan_layers(fn, x, stacked, xs=None, *, remat: str = 'none'):
  """`fn(layer_params, x[, layer_xs]) -> x` applied layer after layer; returns the last x.

  Args:
    fn: one layer. `layer_params` is one slice of `stacked`; `layer_xs` one slice of `xs`
      (e.g. a dropout key per layer), passed only when `xs` is given.
    x: the carry, with rows on its leading axis (kept split over `fsdp` under the 'layer'
      gather).
    stacked: a pytree of arrays with a leading layer axis of the same length L.
    xs: optional pytree of per-layer inputs with the same leading L.
    remat: one of `REMATS`: what each layer saves for the backward pass.
  """
  policy = remat_policy(remat)
  f = fsdp_auto_size()
  lengths = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(stacked)}
  if len(lengths) != 1 or None in lengths:
    raise ConfigError(f'scan_layers: every stacked leaf needs the same leading layer axis; got '
                      f'leading sizes {sorted(map(str, lengths))}.')
  specs = jax.tree.map(lambda a: _slice_spec(jnp.shape(a), f), stacked)
  rows = PartitionSpec(FSDP)

  def body(carry, layer):
    params, extra = layer
    if f > 1:
      params = _gathered(params, specs)
      carry = jax.lax.with_sharding_constraint(carry, rows)
    out = fn(params, carry) if xs is None else fn(params, carry, extra)
    if f > 1:
      out = jax.lax.with_sharding_constraint(out, rows)
    return out, None

  if remat != 'none' or f > 1:
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  out, _ = jax.lax.scan(body, x, (stacked, xs))
  return out


def saved_activation_bytes(loss_fn, params, microbatch, compute_dtype=jnp.float32) -> int:
  """Bytes the backward pass of one micro-batch keeps from its forward pass (the residuals of
  `jax.vjp`, found with `jax.eval_shape`: nothing runs), without the params themselves.

  `params` and `microbatch` may be ShapeDtypeStructs; `microbatch` is one device's rows. With a
  layer scan the residuals are stacked over the layers, so this is the whole activation memory
  the remat policy leaves (XLA adds one layer's working memory on top)."""
  shapes = {tuple(jnp.shape(p)) for p in jax.tree.leaves(params)}

  def residuals(p, mb):
    p = jax.tree.map(lambda x: x.astype(compute_dtype), p)
    return jax.vjp(lambda q: loss_fn(q, mb, None)[0], p)[1]

  saved = jax.eval_shape(residuals, params, microbatch)
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(saved)
             if tuple(x.shape) not in shapes)
