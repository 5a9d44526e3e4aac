"""Jit a `(state, *args) -> (new_state, aux)` function so that a call costs only what it changes.

A donated state that a program returns untouched still costs a fixed amount per buffer on every
call (XLA's CPU runtime aliases, checks and returns each one): in a side probe on the 0.9M
model, a bare add of a gradient tree took 0.27 ms alone and 0.48-0.54 ms with 156 more buffers
donated and passed through. An interim accumulation call returns the params and the inner
optimizer state untouched, so that overhead was most of its cost.

`jit_donating(fn)` traces `fn` once per call signature (`jax.make_jaxpr`) and sorts the state's
leaves by what the program does with them:

- changed (an output that is not the very input): donated, returned, updated in place;
- only read (e.g. the params of an interim call: the forward pass reads them): passed in,
  neither donated nor returned;
- neither read nor changed (e.g. Adam's moments in an interim call): not passed at all; the
  new state holds the caller's very array.

A call on the state the last call returned (or one built from it) then walks only the parts it
passes or changes: every subtree of unread leaves is folded into one leaf of a per-plan prefix
structure and handed through as the very object given. Flattening and rebuilding the whole
~200-leaf state was most of what was left of a small interim call's cost (see `jit_donating`).

The plan is checked again inside every trace of the split program (one per signature jit sees),
so it can never drop an output that the function computes: a leaf is treated as untouched only
if the traced output *is* the input (same tracer), and as unread only if no equation reads it.
"""

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

_ARRAY_AVAL = operator.attrgetter('aval')


def _AVAL(x):  # noqa: N802 (a hashable (shape, dtype, ...) per array, cheaply)
  try:
    return _ARRAY_AVAL(x)
  except AttributeError:  # a ShapeDtypeStruct (lowering without arrays, e.g. the planner)
    return (tuple(x.shape), jnp.dtype(x.dtype), getattr(x, 'sharding', None))


class Plan(NamedTuple):
  """Static: how one call signature's state leaves travel (see the module docstring)."""
  treedef: object
  changed: tuple[int, ...]  # input leaves donated and returned
  read: tuple[int, ...]  # input leaves passed in, not donated, returned as they are
  unread: tuple[int, ...]  # input leaves not passed, returned as they are
  unread_avals: tuple[tuple[tuple[int, ...], object], ...]  # (shape, dtype) of those
  keeps_avals: bool = True  # every changed leaf comes out with the shape and dtype it went in


def _trace(fn, state, args, kwargs):
  """`fn(state, *args, **kwargs)` as a closed jaxpr, and the structure of what it returns."""
  return jax.make_jaxpr(lambda s, a: fn(s, *a, **kwargs), return_shape=True)(state, args)


def make_plan(fn, state, args, kwargs) -> Plan:
  """Traces `fn(state, *args, **kwargs)` (abstractly) and sorts the state's leaves."""
  return _classify(*_trace(fn, state, args, kwargs), state)


def _classify(closed, out_shape, state) -> Plan:
  leaves, treedef = jax.tree.flatten(state)
  if jax.tree.structure(out_shape[0]) != treedef:
    raise ValueError(f'jit_donating: the function returns a new state of another structure '
                     f'({jax.tree.structure(out_shape[0])}) than it was given ({treedef}).')
  jaxpr = closed.jaxpr
  invars = jaxpr.invars[:len(leaves)]
  out_leaves = jaxpr.outvars[:len(leaves)]  # new_state's leaves come first in (new_state, aux)
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, jax_core.Var)}
  used |= {id(v) for v in jaxpr.outvars[len(leaves):] if isinstance(v, jax_core.Var)}
  used |= {id(out) for var, out in zip(invars, out_leaves, strict=True) if out is not var}
  changed, read, unread = [], [], []
  for i, (var, out) in enumerate(zip(invars, out_leaves, strict=True)):
    if out is not var:
      changed.append(i)
    elif id(var) in used:
      read.append(i)
    else:
      unread.append(i)
  keeps = all(_same_type(invars[i].aval, out_leaves[i].aval) for i in changed)
  return Plan(treedef, tuple(changed), tuple(read), tuple(unread),
              tuple((tuple(leaves[i].shape), jnp.dtype(leaves[i].dtype)) for i in unread), keeps)


def _same_type(a, b) -> bool:
  return a.shape == b.shape and a.dtype == b.dtype and getattr(a, 'weak_type', None) == getattr(
      b, 'weak_type', None)


class _PlanChanged(Exception):  # noqa: N818 (control flow: a retrace found another plan)
  pass


def _taker(idx):
  """A C-speed `lambda seq: tuple(seq[i] for i in idx)`."""
  if not idx:
    return lambda seq: ()
  if len(idx) == 1:
    i = idx[0]
    return lambda seq: (seq[i],)
  return operator.itemgetter(*idx)


class _Collapsed:  # a leaf marker: a wholly unread subtree of the state
  pass


_COLLAPSED = _Collapsed()


def _prefix(treedef, unread: set):
  """The state's structure with every subtree of only unread leaves folded into one leaf.

  Returns (prefix treedef, for each of its leaves the state leaf index, or None for a folded
  subtree). A call then walks only the parts of the state it passes or changes: the folded
  subtrees (Adam's moments in an interim call) are handed through as the very objects given.
  """
  marks = jax.tree.unflatten(treedef, range(treedef.num_leaves))

  def fold(node):
    idx = jax.tree.leaves(node)
    if not idx:  # an empty subtree (None, EmptyState()): kept as structure
      return node
    if all(i in unread for i in idx):
      return _COLLAPSED
    children, node_def = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    if jax.tree_util.treedef_is_leaf(node_def):
      return node
    return jax.tree.unflatten(node_def, [fold(c) for c in children])

  folded = fold(marks)
  prefix_def = jax.tree.structure(folded, is_leaf=lambda x: x is _COLLAPSED)
  where = [None if x is _COLLAPSED else x
           for x in jax.tree.leaves(folded, is_leaf=lambda x: x is _COLLAPSED)]
  return prefix_def, where


class _Entry(NamedTuple):
  plan: Plan
  program: object  # the jitted split program
  prefix: object  # the state's treedef with wholly unread subtrees folded (see `_prefix`)
  take_changed: object  # prefix leaves -> the changed ones
  take_read: object  # prefix leaves -> the read ones
  take_folded: object  # prefix leaves -> the folded (unread) subtrees
  take_kept: object  # prefix leaves -> the changed and read ones (array leaves)
  kept_avals: tuple  # their avals in the signature this entry was made for
  merge: object  # (*prefix leaves, *new changed leaves) -> the new state's prefix leaves


def _entry(plan: Plan, program, avals) -> _Entry:
  prefix, where = _prefix(plan.treedef, set(plan.unread))
  at = {i: p for p, i in enumerate(where) if i is not None}  # state leaf -> prefix leaf
  kept = tuple(at.values())
  changed = tuple(at[i] for i in plan.changed)
  n = len(where)
  pos = {p: n + j for j, p in enumerate(changed)}
  return _Entry(plan, program, prefix, _taker(changed), _taker(tuple(at[i] for i in plan.read)),
                _taker(tuple(p for p, i in enumerate(where) if i is None)),
                _taker(kept), tuple(avals[i] for i in at),
                _taker(tuple(pos.get(p, p) for p in range(n))))


class _Last(NamedTuple):
  """What the last call returned: the new state, its signature, and its prefix leaves under
  the plan that made it (what a next call's state is checked against)."""
  state: object
  sig: int
  entry: _Entry
  parts: list


class jit_donating:  # noqa: N801 (used like jax.jit)
  """`jax.jit(fn, donate_argnums=0)` that donates and returns only the state leaves a call
  changes (see the module docstring). Also has `plan(...)`, `lower(...)` (of the program a
  call would run) and `_cache_size()` (programs compiled), like a jitted function. Keyword
  arguments are static (e.g. `last_call`): each value gets its own program.

  Per-call Python is kept small (an interim call of a small model costs about as much as
  this bookkeeping): a state built from the one the last call returned is walked only where
  the call passes or changes it, and checked against it part by part (the very arrays, or
  the same shapes and dtypes; the subtrees the call neither reads nor changes must be the
  very objects returned). Anything else is flattened whole and looked up by signature. The
  other arguments' structure, shapes and dtypes are left to jit's own cache unless a retrace
  for new ones finds that the plan depends on them (then every call keys on them too).

  The state is treated as a value, as JAX treats arrays: a container inside a state this
  function returned should not be changed in place afterwards (build a new one:
  `state._replace(...)`, `{**d, k: v}`). Such a change is still seen wherever the call reads or
  changes the state; inside a subtree the call neither reads nor changes, the subtree is passed
  through as given (as `fn` would), and only a change of its shapes or dtypes goes unseen until
  a call reads it (its program is then traced again for them).
  """

  def __init__(self, fn):
    self._fn = fn
    self._plans: dict = {}  # call key -> _Entry
    self._sigs: dict = {}  # (treedef, avals) of a state -> its number
    self._last: _Last | None = None
    self._key_on_arg_avals = False  # set once a plan turned out to depend on them

  def _program(self, changed, read, args, *, plan: Plan, kwargs):
    kwargs = dict(kwargs)
    leaves = [None] * (len(plan.changed) + len(plan.read) + len(plan.unread))
    for i, x in zip(plan.changed, changed, strict=True):
      leaves[i] = x
    for i, x in zip(plan.read, read, strict=True):
      leaves[i] = x
    unread = [jnp.zeros(shape, dtype) for shape, dtype in plan.unread_avals]
    for i, x in zip(plan.unread, unread, strict=True):
      leaves[i] = x
    state = jax.tree.unflatten(plan.treedef, leaves)
    # One trace serves twice: the plan again, for the exact avals of this trace (it must be
    # what it was), and the program itself (the jaxpr evaluated here).
    closed, out_shape = _trace(self._fn, state, args, kwargs)
    if _classify(closed, out_shape, state) != plan:
      if self._key_on_arg_avals:  # the plan was made for exactly these avals
        raise AssertionError(f'jit_donating: the state plan changed between traces ({plan})')
      raise _PlanChanged  # new argument shapes change the plan: key on them from now on
    outs = jax_core.jaxpr_as_fun(closed)(*jax.tree.leaves((state, args)))
    new_state, aux = jax.tree.unflatten(jax.tree.structure(out_shape), outs)
    new_leaves = jax.tree.leaves(new_state)
    return [new_leaves[i] for i in plan.changed], aux

  def _key(self, sig, args, kwargs):
    key = (sig, tuple(sorted(kwargs.items())) if kwargs else ())
    if self._key_on_arg_avals:
      arg_leaves, arg_tree = jax.tree.flatten(args)
      key += (arg_tree, tuple(map(_AVAL, arg_leaves)))
    return key

  def _from_last(self, state, args, kwargs):
    """(entry, prefix leaves) when `state` is the last returned one, or built from it with
    only arrays of the same shapes and dtypes replaced; else None."""
    last = self._last
    if last is None:
      return None
    entry = self._plans.get(self._key(last.sig, args, kwargs))
    if entry is None:
      return None
    try:
      parts = entry.prefix.flatten_up_to(state)
    except (ValueError, TypeError):
      return None
    if last.entry is entry:  # the same plan as the last call: the parts it returned
      ref = last.parts
      if all(map(operator.is_, parts, ref)):
        return entry, parts
    else:  # another plan (e.g. the emitting one): the returned state under this one's prefix
      # (taken now, so its array leaves are checked by type below, not trusted by identity)
      ref = entry.prefix.flatten_up_to(last.state)
    if not all(map(operator.is_, entry.take_folded(parts), entry.take_folded(ref))):
      return None
    try:
      if tuple(map(_AVAL, entry.take_kept(parts))) != entry.kept_avals:
        return None
    except AttributeError:  # not an array where the signature has one
      return None
    return entry, parts

  def _lookup(self, state, args, kwargs):
    found = self._from_last(state, args, kwargs)
    if found is not None:
      return (*found, self._last.sig)
    leaves, treedef = jax.tree.flatten(state)
    avals = tuple(map(_AVAL, leaves))
    sig = self._signature(treedef, avals)
    key = self._key(sig, args, kwargs)
    entry = self._plans.get(key)
    if entry is None:
      plan = make_plan(self._fn, state, args, kwargs)
      # One jitted program per plan, the plan bound in (a static argument would be hashed on
      # every call).
      program = jax.jit(functools.partial(self._program, plan=plan, kwargs=key[1]),
                        donate_argnums=0)
      entry = self._plans[key] = _entry(plan, program, avals)
    return entry, entry.prefix.flatten_up_to(state), sig

  def _signature(self, treedef, avals) -> int:
    """A small int per distinct (treedef, avals) of the state."""
    return self._sigs.setdefault((treedef, avals), len(self._sigs))

  def plan(self, state, *args, **kwargs) -> Plan:
    """How a call with these arguments passes the state (for inspection and tests)."""
    return self._lookup(state, args, kwargs)[0].plan

  def __call__(self, state, *args, **kwargs):
    entry, parts, sig = self._lookup(state, args, kwargs)
    try:
      changed, aux = entry.program(entry.take_changed(parts), entry.take_read(parts), args)
    except _PlanChanged:
      self._key_on_arg_avals = True
      self._plans.clear()
      self._last = None
      return self(state, *args, **kwargs)
    new_parts = entry.merge((*parts, *changed))
    new_state = entry.prefix.unflatten(new_parts)
    if not entry.plan.keeps_avals:  # the call changed a dtype or shape (the next one retraces)
      leaves, treedef = jax.tree.flatten(new_state)
      sig = self._signature(treedef, tuple(map(_AVAL, leaves)))
    self._last = _Last(new_state, sig, entry, new_parts)
    return new_state, aux

  def split(self, state, *args, **kwargs):
    """(the jitted program a call would run, its arguments): for lowering and benchmarks."""
    entry, parts, _ = self._lookup(state, args, kwargs)
    return entry.program, (entry.take_changed(parts), entry.take_read(parts), args)

  def lower(self, state, *args, **kwargs):
    program, split = self.split(state, *args, **kwargs)
    return program.lower(*split)

  def _cache_size(self) -> int:
    """Programs compiled (one per call signature seen)."""
    return sum(entry.program._cache_size() for entry in self._plans.values())
