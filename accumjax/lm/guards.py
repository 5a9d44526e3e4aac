"""Before a run writes anything: its output directory (one run per directory) and its host memory.

`check_out_dir` refuses an --out that cannot hold the run, `RunLock` keeps a second run out of
a directory in use, `check_host_memory` refuses a call whose batch alone cannot fit. Each says
what to do instead. Not here: building the run (run.py).
"""

import os
import pathlib

from accumjax.config import AccumConfig
from accumjax.errors import ConfigError
from accumjax.lm import data as data_lib
from accumjax.lm.config import TrainConfig
from accumjax.planner import format_bytes


def check_out_dir(out: pathlib.Path, resume) -> None:
  """Refuses an --out that cannot hold this run, before anything is written."""
  if out.exists() and not out.is_dir():
    raise ConfigError(f'--out {str(out)!r} is an existing file, not a directory: give a '
                      'directory (a new one, or a run\'s own with --resume).')
  ckpt_dir = out / 'checkpoints'
  if resume is None and ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise ConfigError(
        f'--out {str(out)!r} already holds a run with checkpoints; pass --resume to continue '
        'it, or give another --out (or delete that directory to start over).')
  existing = next(p for p in (out, *out.absolute().parents) if p.exists())
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f'--out {str(out)!r}: {str(existing)!r} is not writable: give an --out '
                      'under a directory you can write, or make it writable (chmod u+w).')


class RunLock:
  """OUT/.lock: one run per output directory. A lock whose process is gone (a SIGKILLed run)
  is stale and taken over; a live one makes the second run refuse."""

  def __init__(self, out: pathlib.Path):
    self.path = out / '.lock'

  def acquire(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        owner = self._owner()
        if owner is not None and _alive(owner):
          raise ConfigError(f'--out {str(self.path.parent)!r} is in use by another run '
                            f'(process {owner}, {self.path}); wait for it or use another '
                            '--out.') from None
        self.path.unlink(missing_ok=True)  # stale: its process is gone
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(str(os.getpid()))
      return self
    raise ConfigError(f'could not take the lock {self.path}.')

  def _owner(self) -> int | None:
    try:
      return int(self.path.read_text().strip())
    except (OSError, ValueError):
      return None

  def release(self):
    if self._owner() == os.getpid():
      self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def available_host_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (None where there is none)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def check_host_memory(cfg: TrainConfig, accum: AccumConfig, devices: int,
                      available: int | None = None):
  """Refuses a call whose batch alone cannot fit in the host memory available now (a huge
  --grad-accum-steps in scan mode feeds every micro-batch of an update in one call), saying
  what was asked and what fits, before anything is written."""
  available = available_host_bytes() if available is None else available
  per_microbatch = accum.microbatch_size * devices * data_lib.host_bytes_per_row(accum.seq_len)
  need = accum.per_call * per_microbatch
  if available is None or need <= available:
    return
  fits = available // per_microbatch
  source = k_source(cfg)
  raise ConfigError(
      f'K = {accum.num_microbatches} (from {source}) in {accum.mode} mode feeds '
      f'{accum.per_call:,} micro-batches of {accum.microbatch_size} x {devices} device(s) rows '
      f"x {accum.seq_len} tokens in one call, which needs at least {format_bytes(need)} of host "
      f'memory for the batch alone; {format_bytes(available)} is available. At most '
      f'{fits:,} micro-batches fit in one call: lower {source.split()[0]}, or use --accum-mode '
      'multisteps (one micro-batch per call) or hybrid with a smaller --microbatches-per-call.')


def k_source(cfg: TrainConfig) -> str:
  """The flag that set K, as said in a refusal."""
  if cfg.grad_accum_schedule is not None:
    return f'--grad-accum-schedule {cfg.grad_accum_schedule}: its largest K'
  if cfg.grad_accum_steps == 'auto':
    return ('--grad-accum-steps auto: its largest K, --max-grad-accum-steps '
            f'{cfg.max_grad_accum_steps}')
  if cfg.tokens_per_update is not None:
    return f'--tokens-per-update {cfg.tokens_per_update}'
  if cfg.grad_accum_steps is not None:
    return f'--grad-accum-steps {cfg.grad_accum_steps}'
  return '--grad-accum-steps (default 4)'

