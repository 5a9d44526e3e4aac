"""The call driver: one optimizer update from a stream of calls, counted once, here.

A jitted train step (`step.make_train_step` + `step.jit_train_step`) takes one *call*: K
micro-batches in scan mode, one in multisteps mode, c in hybrid mode. `run_update` makes the
calls of one update: it knows from the state where the cycle stands (a run resumed mid-cycle
continues it), says on each call whether it completes the update (`last_call`: the step then
runs its completing program, else the interim one that only adds into the cycle), lets the
caller act after every call (log, save mid-cycle, stop for a preemption), and flushes a cycle
that the data cut short.
The trainer, the experiments, the notebooks and the tests all train through it.

The number of micro-batches may differ from one update to the next (`num_microbatches`), as
long as the optimizer's cycle agrees (in scan mode the call's batch decides it).

`Updates` iterates updates over a whole stream of calls (an epoch) and counts the calls it
took (the data position a checkpoint saves); `pad_rows` pads the end of the data to whole
micro-batches with weight-0 rows.

Not here: where calls come from (any iterator of batches), logging, checkpoints.
"""

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from accumjax.config import AccumConfig
from accumjax.errors import ConfigError, check_int
from accumjax.state import cycle_microbatches


@dataclasses.dataclass
class Update:
  """What `run_update` did.

  Attributes:
    state: the train state after the last call (or the flush).
    metrics: the metrics of the last call (device arrays; after a complete update they are
      the update's: loss, weight, grad_norm, skipped, ...), of the flush if the data ended
      mid-cycle, or None if no call was made.
    calls: calls made by this invocation.
    complete: the update was completed (its last call made, or a partial cycle flushed).
    stopped: `after_call` asked to stop in the middle of the cycle (the state is mid-cycle).
    exhausted: the calls ran out before the update was complete.
  """
  state: Any
  metrics: dict | None
  calls: int
  complete: bool
  stopped: bool = False
  exhausted: bool = False


def calls_per_update(config: AccumConfig, num_microbatches: int | None = None) -> int:
  """Calls in an update of `num_microbatches` (default: the config's K).

  In scan mode an update is one call of up to K micro-batches (the call's batch says how
  many); otherwise K must be a multiple of the micro-batches of one call.
  """
  k = config.num_microbatches if num_microbatches is None else num_microbatches
  check_int('num_microbatches', k)
  if config.mode == 'scan':
    if k > config.num_microbatches:
      raise ConfigError(f'num_microbatches={k}: a scan call holds at most the '
                        f'{config.num_microbatches} micro-batches the step was built for.')
    return 1
  if k % config.per_call:
    raise ConfigError(f'num_microbatches={k} must be a multiple of the {config.per_call} '
                      f'micro-batch(es) of one {config.mode} call.')
  return k // config.per_call


def calls_done(state, config: AccumConfig) -> int:
  """Calls already made in the state's current cycle (0 at a cycle boundary; one device
  read)."""
  position = cycle_microbatches(state)
  done, rest = divmod(position, config.per_call)
  if rest:
    raise ConfigError(
        f'the state is {position} micro-batches into its cycle, not a whole '
        f'number of {config.mode} calls of {config.per_call}; finish the cycle with the setup '
        'that started it, or flush it.')
  return done


def run_update(
    step: Callable,
    state,
    calls: Iterable,
    config: AccumConfig,
    *,
    num_microbatches: int | None = None,
    after_call: Callable[[Any, dict, int], bool | None] | None = None,
    flush: Callable | None = None,
    position: int | None = None,
) -> Update:
  """Runs one optimizer update: the calls that complete the state's current cycle.

  Args:
    step: the jitted train step, `step(state, batch, last_call=bool) -> (state, metrics)`.
    state: the train state; its cycle says how much of the update is done.
    calls: an iterator of call batches (each `config.per_call` micro-batches, global rows);
      exactly the calls this update still needs are taken from it.
    config: the accumulation setup.
    num_microbatches: K of this update (default `config.num_microbatches`).
    after_call: `after_call(state, metrics, position)`, called after every call with the
      number of the cycle's calls done so far (1-based). A true return in the middle of the
      cycle stops there (`Update.stopped`); after the cycle's last call it is ignored (the
      update is complete; the caller decides what comes next).
    flush: the jitted `step.make_flush(...)`; if given and the calls run out mid-cycle, the
      partial cycle is applied as its own update (exact for the micro-batches it had).
    position: calls already made in the state's cycle, when the caller has read it
      (`calls_done(state, config)`, one device read); by default read here.

  Returns:
    An `Update`.
  """
  calls = iter(calls)
  total = calls_per_update(config, num_microbatches)
  if position is None:
    position = calls_done(state, config)
  if position >= total:
    raise ConfigError(f'the state is {position} calls into a cycle of {total}.')
  metrics, made = None, 0
  while position < total:
    batch = next(calls, None)
    if batch is None:
      if flush is not None and position > 0:
        state, metrics = flush(state)
        return Update(state, metrics, made, complete=True, exhausted=True)
      return Update(state, metrics, made, complete=False, exhausted=True)
    position += 1
    state, metrics = step(state, batch, last_call=position == total)
    made += 1
    stop = after_call(state, metrics, position) if after_call is not None else False
    if stop and position < total:
      return Update(state, metrics, made, complete=False, stopped=True)
  return Update(state, metrics, made, complete=True)


def split_calls(batch, config: AccumConfig) -> list:
  """A global batch cut into calls of `config.per_call` micro-batches, rows in order (one
  update's batch gives its calls; a shorter batch, the end of the data, gives fewer calls, the
  last one holding fewer whole micro-batches)."""
  rows_per_microbatch = config.microbatch_size * config.num_devices
  rows = config.per_call * rows_per_microbatch
  n = jax.tree.leaves(batch)[0].shape[0]
  if n % rows_per_microbatch:
    raise ConfigError(f'{n} rows are not whole micro-batches of {config.microbatch_size} rows '
                      f'x {config.num_devices} device(s); pad the last one with weight-0 rows: '
                      f'loop.pad_rows(batch, {rows_per_microbatch}, weight=...).')
  return [jax.tree.map(lambda x, s=s: x[s:s + rows], batch) for s in range(0, n, rows)]


class Updates:
  """One optimizer update at a time from a stream of calls: `for update in Updates(...)`.

  Each item is the `Update` of a completed update (its metrics are the update's: loss,
  weight, grad_norm, ...). Iteration ends when the calls run out (a cycle they cut short is
  flushed if `flush` is given, and that flush is the last item; else it stays in `state`) or
  when `after_call` stops it mid-cycle.

  Attributes:
    state: the newest train state: after the loop, a cycle the data cut short (or a stop)
      included, so the next epoch's calls, or a resumed run, continue it.
    consumed: calls taken from `calls` so far: the data position to save with a checkpoint
      (`Checkpointer.save(state, data_position=...)`) and to restart the calls from. It counts
      the call just made when `after_call` runs.

  Args: as `run_update` (`num_microbatches` may also be a function of the update about to
  run, `state.update_step`: a K schedule).
  """

  def __init__(self, step: Callable, state, calls: Iterable, config: AccumConfig, *,
               num_microbatches: int | Callable[[int], int] | None = None,
               after_call: Callable[[Any, dict, int], bool | None] | None = None,
               flush: Callable | None = None):
    self.step, self.state, self.config = step, state, config
    self.consumed = 0
    self._calls, self._k = iter(calls), num_microbatches
    self._after_call, self._flush = after_call, flush

  def _counted(self):
    for batch in self._calls:
      self.consumed += 1
      yield batch

  def __iter__(self):
    calls = self._counted()
    while True:
      k = self._k(int(self.state.update_step)) if callable(self._k) else self._k
      done = run_update(self.step, self.state, calls, self.config, num_microbatches=k,
                        after_call=self._after_call, flush=self._flush)
      self.state = done.state
      if done.complete and done.calls:
        yield done
      if done.exhausted or done.stopped:
        return


def pad_rows(batch, multiple: int, *, weight: str | None = None):
  """`batch` with zero rows appended so that its row count is a multiple of `multiple` (e.g.
  `config.microbatch_size * config.num_devices`, or that x K for whole updates), and, if
  `weight` names a leaf, that leaf 0 on the new rows (created: 1.0 on the real rows, if the
  batch has none).

  Exact: a row whose weight is 0 adds nothing to a loss sum or a weight written in
  (sum, weight) form, provided the loss gives such a row a finite value and multiplies it by
  its weight (or selects it out with `jnp.where`). Zero inputs give finite values for the
  usual losses; a loss that divides by an input or takes its log must guard it.
  """
  check_int('multiple', multiple)
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ConfigError('batch= has no arrays to pad.')
  n = leaves[0].shape[0]
  if any(x.shape[:1] != (n,) for x in leaves):
    raise ConfigError(f'batch= leaves have different row counts: '
                      f'{sorted({x.shape[0] if x.ndim else None for x in leaves}, key=str)}.')
  missing = -n % multiple
  pad = lambda x: jnp.concatenate([x, jnp.zeros((missing, *x.shape[1:]), x.dtype)])
  out = jax.tree.map(pad, batch) if missing else batch
  if weight is not None:
    if not isinstance(batch, dict):
      raise ConfigError(f'weight={weight!r} names a leaf of a dict batch; got a '
                        f'{type(batch).__name__}.')
    w = batch.get(weight, jnp.ones((n,), jnp.float32))
    out = dict(out, **{weight: pad(w) if missing else w})
  return out
