"""Main job: train a byte-level transformer LM on real text with gradient accumulation.

    python -m experiments.train                       # defaults: ~2 minutes on 2 CPU cores

Data: by default the Python standard library's own sources (no download; see accumjax.data).
Defaults: 0.86M-param model, micro-batch 8 x 128 tokens, K=4 (4,096 tokens per update, scan
mode), AdamW 3e-3 with cosine decay, 300 updates. The train loss falls from about 6.3 to about
1.6 and the eval loss to about 1.9 (docs/train.md has the measured
numbers). Writes metrics.jsonl, config.json, loss.png and checkpoints/ to --out (default
runs/train-<time>). Exit status: 0 done, 2 bad flags (one line, nothing written), 1 a
checkpoint error or a stop for non-finite values (--nonfinite-policy raise, or
--max-consecutive-skips skipped updates in a row), with one line saying which.
The logic lives in accumjax.lm.train, importable from a notebook.
"""

import argparse
import os
import pathlib
import signal
import sys
import time

from accumjax.checkpoint import CheckpointError
from accumjax.config import AccumConfig
from accumjax.core import ConfigError
from accumjax.lm.build import plan_only
from accumjax.lm.config import ON_CONFIG_CHANGE, PRESETS, TrainConfig, accum_settings
from accumjax.lm.data import DataError
from accumjax.lm.logs import Logger
from accumjax.lm.model import ModelConfig
from accumjax.lm.train import NonFiniteError, train_and_evaluate
from accumjax.settings import flag_of, flat_name, from_word, settings_of, to_word

# The --help sections, in order, of the settings' groups (and of the run's own flags).
GROUPS = {
    'data': 'data', 'accumulation': 'accumulation',
    'parallel': "data parallel / multi-host (JAX's own runtime: a Mesh, jax.distributed)",
    'logging': 'logging',
    'nonfinite': 'non-finite values (NaN/Inf in a micro-batch loss or gradient)',
    'optimization': 'optimization', 'model': 'model', 'run': 'run',
    'checkpoints': 'checkpoints (Orbax, in OUT/checkpoints)',
}
# The nested configs whose settings are flags too, by their TrainConfig field.
NESTED = {'accum': AccumConfig, 'model': ModelConfig}


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value and value.isdigit() else None


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one clear line, not usage + traceback
    sys.stderr.write(f'error: {message} (see --help)\n')
    sys.exit(2)


def _flag_type(parse):
  """An argparse type from a setting's parser: its ValueError message is the error."""
  def convert(text):
    try:
      return parse(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  convert.__name__ = getattr(parse, '__name__', 'value')
  return convert


def _add_setting(group, field, meta, dest, default):
  """The flag of one declared setting (accumjax/settings.py), in its words."""
  default = to_word(field, default)
  kwargs = dict(dest=dest, default=default, help=meta['help'])
  if isinstance(default, bool):
    kwargs['action'] = 'store_true' if not default else argparse.BooleanOptionalAction
  else:
    kwargs['type'] = _flag_type(meta['parse'] or (str if default is None else type(default)))
    if meta['choices'] is not None:
      kwargs['choices'] = [to_word(field, c) for c in meta['choices']]
    kwargs['metavar'] = meta['metavar'] or field.name.upper()
  group.add_argument(flag_of(field), **kwargs)


def _run_flags(groups):
  """The flags that are not settings of the run's config: where it runs and writes."""
  g = groups['parallel']
  g.add_argument('--coordinator-address', default=os.environ.get('JAX_COORDINATOR_ADDRESS'),
                 metavar='HOST:PORT', help='multi-process: process 0\'s address '
                 '(env JAX_COORDINATOR_ADDRESS)')
  g.add_argument('--num-processes', type=int, default=_env_int('JAX_NUM_PROCESSES'),
                 help='multi-process: how many (env JAX_NUM_PROCESSES)')
  g.add_argument('--process-id', type=int, default=_env_int('JAX_PROCESS_ID'),
                 help='multi-process: this one, 0..N-1 (env JAX_PROCESS_ID)')
  g.add_argument('--distributed', action='store_true',
                 help='jax.distributed.initialize() with cluster auto-detection (SLURM, ...)')
  g = groups['run']
  g.add_argument('--preset', choices=list(PRESETS), default=None,
                 help='a model and batch size by name (flags given beside it win): ' + '; '.join(
                     f'{name}: ' + ' '.join(f'{k}={v}' for k, v in values.items())
                     for name, values in PRESETS.items()))
  g.add_argument('--plan-only', action='store_true',
                 help='print the plan (with --memory-budget: the remat, micro-batch and K it '
                      'chooses and what it weighed), the memory per device and K; no training')
  g.add_argument('--out', default=None, help='output directory (default runs/train-<time>)')
  g.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                 help='progress bar (default: only on a terminal)')
  g = groups['checkpoints']
  g.add_argument('--resume', nargs='?', const='latest', default=None, metavar='STEP',
                 help='continue the run in --out from its newest good checkpoint (or STEP, an '
                      'Orbax step = micro-batches done); final params are bit-identical to an '
                      'uninterrupted run')
  g.add_argument('--on-config-change', default='refuse', choices=list(ON_CONFIG_CHANGE),
                 help='when resuming mid-cycle with another batch size/K/mode: refuse '
                      '(default), or flush the partial cycle as its own update first')


def parse_args(argv=None):
  """The flags: one per declared setting of TrainConfig and its nested AccumConfig and
  ModelConfig (defaults: those of `TrainConfig()`), then the run's own."""
  p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  groups = {name: p.add_argument_group(title) for name, title in GROUPS.items()}
  default = TrainConfig()
  for field, meta in settings_of(TrainConfig):
    _add_setting(groups[meta['group']], field, meta, field.name, getattr(default, field.name))
  for where, cls in NESTED.items():
    for field, meta in settings_of(cls):
      _add_setting(groups[meta['group']], field, meta, f'{where}__{field.name}',
                   getattr(getattr(default, where), field.name))
  _run_flags(groups)
  preset = p.parse_known_args(argv)[0].preset
  if preset is not None:  # the preset's values become the defaults; flags given still win
    p.set_defaults(**{_dests()[name]: value for name, value in PRESETS[preset].items()})
  return p.parse_args(argv)


def _dests() -> dict:
  """flat setting name -> its argparse dest."""
  out = {flat_name(f): f.name for f, _ in settings_of(TrainConfig)}
  for where, cls in NESTED.items():
    out.update({flat_name(f) if where == 'accum' else f.name: f'{where}__{f.name}'
                for f, _ in settings_of(cls)})
  return out


def config_from_args(a) -> TrainConfig:
  """The TrainConfig of parsed flags (every declared setting read back by its field)."""
  given = {where: {f.name: from_word(f, getattr(a, f'{where}__{f.name}'))
                   for f, _ in settings_of(cls)} for where, cls in NESTED.items()}
  return TrainConfig(accum=accum_settings(**given['accum']), model=ModelConfig(**given['model']),
                     **{f.name: getattr(a, f.name) for f, _ in settings_of(TrainConfig)})


class _Preemption:
  """SIGTERM/SIGINT set a flag; the loop finishes its call, checkpoints and returns."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested:  # a second signal: stop now
      raise KeyboardInterrupt
    self.requested = True
    sys.stderr.write(f'{signal.Signals(signum).name}: finishing this call, then saving\n')

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class _QuietClosedLoops:
  """Drops one kind of unraisable exception while the run lasts: RuntimeError('Event loop is
  closed'), raised when tensorstore completes the writes of a failed background save into the
  asyncio loop Orbax has already closed (dozens per failed save, each printed line by line by
  the default hook, from other threads, so they cut into the run's own `error: ` line). Orbax
  still logs the failure itself (absl ERROR), and the run reports it once."""

  def __enter__(self):
    self._previous = sys.unraisablehook
    sys.unraisablehook = self._hook
    return self

  def _hook(self, unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
      self._previous(unraisable)

  def __exit__(self, *exc):
    sys.unraisablehook = self._previous
    return False


def init_distributed(a):
  """Joins the processes of a multi-host run (before anything touches a device)."""
  explicit = (a.coordinator_address, a.num_processes, a.process_id)
  if not a.distributed and all(v is None for v in explicit):
    return
  if not a.distributed and None in explicit:
    raise ConfigError('multi-process needs --coordinator-address, --num-processes and '
                      f'--process-id together (got {explicit}), or --distributed for cluster '
                      'auto-detection.')
  if a.num_processes is not None and not 0 <= a.process_id < a.num_processes:
    raise ConfigError(f'--process-id {a.process_id} must be in 0..{a.num_processes - 1}.')
  import jax
  # CPU devices talk over gloo; GPUs use NCCL whatever this says.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(a.coordinator_address, a.num_processes, a.process_id)


def _checkpoints_word(out) -> str:
  """What a failed run leaves to resume from: its newest committed checkpoint, or nothing."""
  directory = pathlib.Path(out) / 'checkpoints'
  try:
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  except OSError:
    steps = []
  if not steps:
    return ('No checkpoint was committed: nothing to resume; free the space (or fix the '
            'cause) and start the run again.')
  return (f'The newest committed checkpoint (step {steps[-1]} in {directory}) is intact; '
          '--resume continues from it.')


def main(argv=None):
  args = parse_args(argv)
  if args.resume is not None and args.out is None:
    sys.stderr.write('error: --resume needs the --out of the run to continue\n')
    return 2
  out = args.out or time.strftime('runs/train-%Y%m%d-%H%M%S')
  resume = args.resume
  if resume not in (None, 'latest'):
    if not resume.isdigit():
      sys.stderr.write(f'error: --resume {resume!r}: give a step number or nothing\n')
      return 2
    resume = int(resume)
  try:
    init_distributed(args)
    cfg = config_from_args(args)
    if args.plan_only:
      for key, value in plan_only(cfg):
        print(f'{key:>24}: {value}')
      return 0
    with _Preemption() as preemption, _QuietClosedLoops():
      train_and_evaluate(cfg, out, Logger(progress=args.progress), resume=resume,
                         on_config_change=args.on_config_change,
                         should_stop=lambda: preemption.requested)
  except (ConfigError, DataError) as e:
    sys.stderr.write(f'error: {e}\n')
    return 2
  except (CheckpointError, NonFiniteError) as e:
    sys.stderr.write(f'error: {e}\n')
    return 1
  except MemoryError as e:  # what the up-front check could not foresee
    sys.stderr.write(f'error: out of host memory ({type(e).__name__}: {e}). Lower '
                     '--grad-accum-steps or --batch-size, or feed fewer micro-batches per call '
                     f'(--accum-mode multisteps or hybrid). {_checkpoints_word(out)}\n')
    return 1
  except OSError as e:  # writing metrics, config.json or the plot failed (disk full, ...)
    sys.stderr.write(f'error: could not write the run\'s outputs: {e}. '
                     f'{_checkpoints_word(out)}\n')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
