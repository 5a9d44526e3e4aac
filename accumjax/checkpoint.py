"""Orbax checkpoints of the whole training state, mid-cycle accumulation included.

A checkpoint holds the `TrainState` (params, the optimizer state, the cycle's summed
gradients, loss sum, weight and counters, the RNG key data, update/micro-step counters) and a
JSON `meta` item: the run's config, the data iterator position, logging state, and our own
fingerprint of the saved state. Orbax does not checksum array data, so `restore` recomputes the
fingerprint and refuses a checkpoint whose bytes changed.

- The Orbax step is `microbatches_seen(state)`, strictly increasing over micro-batches, so saves in
  the middle of a cycle are never dropped (Orbax silently refuses a step not newer than the
  latest; we turn that into an error).
- Saving is asynchronous where Orbax offers it. What is saved is a private copy of the state,
  made before `save` returns, so a train step that donates (and so overwrites) its input
  buffers can never change what is being written.
- Restoring always goes through an abstract target built from a fresh state (namedtuples come
  back as namedtuples, shardings are the caller's) with the dtypes recorded at save time (so
  they cannot drift, e.g. to float64 under jax_enable_x64), newest checkpoint first, falling
  back to older ones with a reason for each skipped step.
"""

import dataclasses
import hashlib
import json
import math
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from accumjax.errors import ConfigError
from accumjax.state import microbatches_seen


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a save that could not be made."""


@dataclasses.dataclass
class Restored:
  state: object
  meta: dict
  step: int
  skipped: list[tuple[int, str]]  # (step, why) for newer checkpoints that were not usable
  moved: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (step, moved to)

  @property
  def data_position(self):
    """What `Checkpointer.save(..., data_position=...)` stored (None if nothing)."""
    return self.meta.get('data_position')


_META_KEYS = ('step', 'fingerprint', 'dtypes')


def json_safe(value):
  """`value` with every NaN or Inf float (Python or numpy) replaced by None, recursively: what a
  strict JSON reader (jq, JSON.parse) accepts. None then means "no finite value"."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def meta_fingerprint(meta: dict) -> str:
  """sha256 (16 hex digits) of the metadata's canonical JSON, without this field itself."""
  body = {k: v for k, v in meta.items() if k != 'meta_fingerprint'}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _meta_problem(meta) -> str | None:
  """Why a checkpoint's metadata cannot be trusted, or None."""
  if not isinstance(meta, dict):
    return f'metadata is a {type(meta).__name__}, not an object'
  missing = [k for k in _META_KEYS if k not in meta]
  if missing:
    return f'incomplete metadata (missing {", ".join(missing)})'
  # Checkpoints written before the metadata fingerprint existed have none; all others must match.
  if 'meta_fingerprint' in meta and meta['meta_fingerprint'] != meta_fingerprint(meta):
    return (f'metadata fingerprint mismatch: saved {meta["meta_fingerprint"]}, computed '
            f'{meta_fingerprint(meta)} (the metadata was changed)')
  return None


def _first_line(e: Exception) -> str:
  """Type and first line of an error, long paths elided in the middle (the cause is at the end)."""
  line = (str(e).splitlines() or [''])[0]
  if len(line) > 300:
    line = f'{line[:100]} ... {line[-180:]}'
  return f'{type(e).__name__}: {line}'


def fingerprint(tree) -> str:
  """Bitwise identity of a pytree: sha256 (first 16 hex digits) of every leaf's path, dtype,
  shape and bytes, in tree order. Equal on one machine for equal computations; XLA's CPU code
  depends on the processor, so across machines compare values, not fingerprints.

  An array sharded over several processes (FSDP across hosts) is all-gathered first: every
  process must call this together, as every process saves and restores together."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    a = np.asarray(leaf)
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def abstract_like(state):
  """ShapeDtypeStructs (with shardings) of `state`: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class Checkpointer:
  """Saves to and restores from `directory` (one Orbax CheckpointManager)."""

  def __init__(self, directory, *, keep: int | None = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, item_names=('state', 'meta'),
                                          options=self._options)

  def steps(self) -> list[int]:
    try:
      return sorted(self._manager.all_steps())
    except OSError as e:
      raise CheckpointError(
          f'cannot list the checkpoints in {self.directory}: {e}. Make it readable (chmod -R '
          'u+rwX), or move the unreadable entries out of it and resume again.') from None

  def unfinished(self) -> list[str]:
    """Names of saves that never committed (a kill during an async save leaves these)."""
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir() if 'orbax-checkpoint-tmp' in p.name)

  def save(self, state, meta: dict | None = None, *, data_position=None) -> int:
    """Starts saving `state` with `meta` (a JSON-able dict) under step
    `microbatches_seen(state)` (micro-batches done, mid-cycle ones included); returns the step.

    `data_position` (JSON-able: e.g. `loop.Updates.consumed`, the calls taken so far, or your
    data iterator's state) comes back as `Restored.data_position`, so a resumed run restarts
    its data where the saved state stopped, mid-cycle included."""
    step = microbatches_seen(state)
    snapshot = jax.tree.map(jnp.copy, state)  # the train step may donate `state` next
    meta = dict(meta or {})
    if data_position is not None:
      try:
        json.dumps(data_position)
      except TypeError as e:
        raise ConfigError(f'data_position={data_position!r} must be JSON-able (numbers, '
                              f'strings, lists, dicts): {e}.') from None
      meta['data_position'] = data_position
    meta = json_safe(dict(meta, step=step, fingerprint=fingerprint(snapshot),
                          dtypes=[str(x.dtype) for x in jax.tree.leaves(snapshot)]))
    meta['meta_fingerprint'] = meta_fingerprint(meta)
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(snapshot), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
          f'checkpoint save failed in {self.directory} while starting step {step} (an earlier '
          f'background save can fail here too): {_first_line(e)}. Nothing half-written is '
          'ever restored; --resume uses the newest committed checkpoint.') from e
    if not saved:
      raise CheckpointError(
          f'Orbax did not save step {step}: it is not newer than the latest step '
          f'{self._manager.latest_step()} in {self.directory}.')
    return step

  def wait(self):
    """Blocks until pending saves are on disk; raises what a background save raised."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
          f'a background checkpoint save in {self.directory} failed: {_first_line(e)}. That '
          'step was not committed; --resume uses the newest committed checkpoint.') from e

  def path(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, target_for_meta, step: int | None = None, *,
              move_aside: bool = False) -> Restored:
    """Restores the newest good checkpoint (or exactly `step`).

    Args:
      target_for_meta: `meta -> fresh state` (arrays or ShapeDtypeStructs, with the shardings
        wanted now); called with each candidate's meta, so the target can follow the saved
        config (e.g. its optimizer structure).
      step: a specific step; by default the newest good one.
      move_aside: after a successful restore, move every newer step (broken ones skipped on the
        way, or good ones when `step` rolls back) out of the directory into
        `<directory>.moved-aside/<time>/`, kept for inspection and never deleted, so that the
        run can save again from here (Orbax refuses a step that is not newer than the newest
        one present). `Restored.moved` lists them.
    """
    candidates = sorted(self.steps(), reverse=True) if step is None else [step]
    if step is not None and step not in self.steps():
      raise CheckpointError(
          f'no checkpoint at step {step} in {self.directory}; available: {self.steps()}.')
    skipped = [(name, 'unfinished save (killed while writing), ignored')
               for name in self.unfinished()]
    for s in candidates:
      try:
        meta = self.read_meta(s)
      except Exception as e:  # noqa: BLE001 (any Orbax/tensorstore failure means: unusable)
        skipped.append((s, f'unreadable meta ({_first_line(e)})'))
        continue
      problem = _meta_problem(meta)
      if problem:
        skipped.append((s, problem))
        continue
      target = abstract_like(target_for_meta(meta))  # its errors (config refusals) propagate
      leaves, treedef = jax.tree.flatten(target)
      if len(leaves) != len(meta.get('dtypes', leaves)):
        skipped.append((s, f'holds {len(meta["dtypes"])} arrays, the target {len(leaves)}'))
        continue
      # The saved dtypes, not the fresh state's: under jax_enable_x64 a fresh optax state can
      # come out float64, and restoring into it would silently widen float32 state.
      target = treedef.unflatten([
          jax.ShapeDtypeStruct(x.shape, jnp.dtype(d), sharding=x.sharding)
          for x, d in zip(leaves, meta.get('dtypes', [x.dtype for x in leaves]), strict=True)])
      try:
        state = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
      except Exception as e:  # noqa: BLE001
        skipped.append((s, f'unreadable state ({_first_line(e)})'))
        continue
      actual = fingerprint(state)
      if actual != meta.get('fingerprint'):
        skipped.append((s, f'fingerprint mismatch: saved {meta.get("fingerprint")}, '
                           f'restored {actual} (corrupted data)'))
        continue
      restored = Restored(state, meta, s, skipped)
      if move_aside:
        restored.moved = self._move_aside([n for n in self.steps() if n > s])
      return restored
    reasons = '; '.join(f'{s}: {why}' for s, why in skipped) or 'none found'
    raise CheckpointError(
        f'no usable checkpoint in {self.directory} ({reasons}). Unreadable ones may only need '
        'their permissions fixed (chmod -R u+rwX); otherwise start the run afresh in another '
        '--out.')

  def _move_aside(self, steps: list[int]) -> list[tuple[int, str]]:
    if not steps:
      return []
    self.wait()
    dest = self.directory.with_name(self.directory.name + '.moved-aside') / time.strftime(
        '%Y%m%d-%H%M%S')
    moved = [(s, str(dest / str(s))) for s in steps]
    if jax.process_index() == 0:  # the directory is shared by all processes: one moves
      dest.mkdir(parents=True, exist_ok=True)
      for s, where in moved:
        shutil.move(str(self.path(s)), where)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('accumjax checkpoints moved aside')
    self._manager.close()  # it caches the steps it has seen; start afresh without them
    self._manager = ocp.CheckpointManager(self.directory, item_names=('state', 'meta'),
                                          options=self._options)
    return moved

  def close(self):
    try:
      self._manager.close()
    except Exception:  # noqa: BLE001 (already reported by wait(); closing must not mask it)
      pass
