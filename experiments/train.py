"""Main job: train a byte-level transformer LM on real text with gradient accumulation.

    python -m experiments.train                       # defaults: ~2 minutes on 2 CPU cores

Data: by default the Python standard library's own sources (no download; see accumjax.data).
Defaults: 0.86M-param model, micro-batch 8 x 128 tokens, K=4 (4,096 tokens per update, scan
mode), AdamW 3e-3 with cosine decay, 300 updates. The train loss falls from about 6.3 to about
1.6 and the eval loss to about 1.9 (the README's "What the main job does" has the measured
numbers). Writes metrics.jsonl, config.json, loss.png and checkpoints/ to --out (default
runs/train-<time>). Exit status: 0 done, 2 bad flags (one line, nothing written), 1 a
checkpoint error or a stop for non-finite values (--nonfinite-policy raise, or
--max-consecutive-skips skipped updates in a row), with one line saying which.
The logic lives in accumjax.lm.train, importable from a notebook.
"""

import argparse
import os
import signal
import sys
import time

from accumjax.checkpoint import CheckpointError
from accumjax.config import (
    ACCUMULATOR_MEMORIES,
    DP_REDUCTIONS,
    FSDP_REDUCES,
    LR_BATCH_SCALING,
    MODES,
    MULTISTEPS_IMPLS,
    NONFINITE_POLICIES,
)
from accumjax.core import ConfigError
from accumjax.lm.config import ON_CONFIG_CHANGE, OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig
from accumjax.lm.data import DataError
from accumjax.lm.logs import Logger
from accumjax.lm.model import POSITIONS, ModelConfig
from accumjax.lm.train import NonFiniteError, train_and_evaluate


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value and value.isdigit() else None


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one clear line, not usage + traceback
    sys.stderr.write(f'error: {message} (see --help)\n')
    sys.exit(2)


def parse_args(argv=None):
  d, dm = TrainConfig(), ModelConfig()
  p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group('data')
  g.add_argument('--data', default=None, help='text file or directory of text files, or a '
                 'built-in corpus: builtin:stdlib (the default: the Python standard library '
                 'sources) or builtin:prose (the English documentation in pydoc_data/topics.py)')
  g.add_argument('--seq-len', type=int, default=d.seq_len, help='tokens per example')
  g.add_argument('--pack', action='store_true', help='pack examples into full rows (no padding)')
  g = p.add_argument_group('accumulation')
  g.add_argument('--batch-size', type=int, default=d.microbatch_size,
                 help='micro-batch size (sequences per micro-batch, per device)')
  g.add_argument('--grad-accum-steps', type=_k_arg, default=None, metavar='K|auto',
                 help='K, micro-batches per optimizer update (default 4); "auto": K follows '
                      'the measured gradient noise scale (B_simple, smoothed), a power of two '
                      'from 2 to --max-grad-accum-steps, changed at most every 10 updates')
  g.add_argument('--grad-accum-schedule', default=None, metavar='U:K,...',
                 help='K per update as a ramp, e.g. "0:2,200:4,400:8" (from update U on, K)')
  g.add_argument('--max-grad-accum-steps', type=int, default=d.max_grad_accum_steps,
                 help='the largest K of --grad-accum-steps auto')
  g.add_argument('--lr-batch-scaling', default=d.lr_batch_scaling,
                 choices=list(LR_BATCH_SCALING),
                 help='when K changes (schedule, auto), scale the learning rate by (K / first '
                      'K) ** 1 (linear, SGD) or ** 0.5 (sqrt, Adam)')
  g.add_argument('--tokens-per-update', type=int, default=None,
                 help='sets K = N / (batch size x seq len x devices); must divide')
  g.add_argument('--accum-mode', default=d.accum_mode, choices=list(MODES),
                 help='scan: one call per update; multisteps: one call per micro-batch '
                      '(optax.MultiSteps); hybrid: c micro-batches per call')
  g.add_argument('--microbatches-per-call', type=int, default=None,
                 help='c for hybrid mode (default K/2 for even K, else 1)')
  g.add_argument('--multisteps-impl', default=d.multisteps_impl, choices=list(MULTISTEPS_IMPLS),
                 help='lazy: optimizer runs only on the last call of a cycle; optax: '
                      'optax.MultiSteps as shipped (same state and results)')
  g.add_argument('--memory-budget', default=None, metavar='SIZE',
                 help='e.g. 2GiB: pick the largest micro-batch whose compiled step fits (XLA '
                      'memory analysis), then K from --tokens-per-update')
  g.add_argument('--precision', default=d.precision, choices=list(PRECISIONS),
                 help='compute precision; params and accumulation stay float32. fp16 uses '
                      'dynamic loss scaling; bf16 needs none (float32 exponent range)')
  g = p.add_argument_group(
      'data parallel / multi-host (JAX\'s own runtime: a Mesh, jax.distributed)')
  g.add_argument('--mesh', default=None, metavar='data=D,fsdp=F',
                 help='device mesh; default: all devices of all processes, data parallel. '
                      'fsdp=F shards params, optimizer state and accumulator over F devices '
                      '(data=D,fsdp=F: D groups of F). The batch size is per device: '
                      'effective batch = batch x K x D x F')
  g.add_argument('--fsdp-reduce', default=d.fsdp_reduce, choices=list(FSDP_REDUCES),
                 help='with fsdp: reduce-scatter the gradients into each device\'s shard once '
                      'per call (full-size accumulator inside the call, one collective) or '
                      'after every micro-batch (accumulator a shard, one collective each)')
  g.add_argument('--accumulator-memory', default=d.accumulator_memory,
                 choices=list(ACCUMULATOR_MEMORIES),
                 help='multisteps/hybrid: keep the float32 gradient sums between calls in '
                      'device or host memory (pinned_host; moved in and out every call). On a '
                      'CPU backend both are the same RAM')
  g.add_argument('--dp-reduction', default=d.dp_reduction, choices=list(DP_REDUCTIONS),
                 help='how devices\' gradient sums meet, once per call: psum (one all-reduce) '
                      'or ordered (all-gather + sum in device order: bitwise the same on any '
                      'process layout, N x gradient memory)')
  g.add_argument('--coordinator-address', default=os.environ.get('JAX_COORDINATOR_ADDRESS'),
                 metavar='HOST:PORT', help='multi-process: process 0\'s address '
                 '(env JAX_COORDINATOR_ADDRESS)')
  g.add_argument('--num-processes', type=int, default=_env_int('JAX_NUM_PROCESSES'),
                 help='multi-process: how many (env JAX_NUM_PROCESSES)')
  g.add_argument('--process-id', type=int, default=_env_int('JAX_PROCESS_ID'),
                 help='multi-process: this one, 0..N-1 (env JAX_PROCESS_ID)')
  g.add_argument('--distributed', action='store_true',
                 help='jax.distributed.initialize() with cluster auto-detection (SLURM, ...)')
  g = p.add_argument_group('logging')
  g.add_argument('--log-microbatches', action='store_true',
                 help='also log every call (per-micro-batch view: accum 3/4)')
  g.add_argument('--noise-stats', action=argparse.BooleanOptionalAction, default=d.noise_stats,
                 help='estimate the gradient noise scale B_simple of every update from its '
                      'micro-batches (logged, in metrics.jsonl and noise_scale.png; needs '
                      'K x devices >= 2, else off)'),
  g = p.add_argument_group('non-finite values (NaN/Inf in a micro-batch loss or gradient)')
  g.add_argument('--nonfinite-policy', default=d.nonfinite_policy, choices=list(
      NONFINITE_POLICIES), help='skip_update: skip the whole update (params and optimizer '
                      'state unchanged, cycle stays aligned); skip_microbatch: drop the bad '
                      'micro-batches, renormalise by the remaining weight; raise: stop (exit '
                      '1) naming the update and micro-batch')
  g.add_argument('--max-consecutive-skips', type=int, default=d.max_consecutive_skips,
                 help='stop (exit 1) after N skipped updates in a row (0: never)')
  g.add_argument('--inject-faults', default=None, metavar='U:J[:V],...',
                 help='fault drill: multiply the loss of micro-batch J (from 0) of update U '
                      '(from 1) by V (nan default, inf, or a factor such as 1e6)')
  g = p.add_argument_group('optimization')
  g.add_argument('--optimizer', default=d.optimizer, choices=list(OPTIMIZERS))
  g.add_argument('--lr', type=float, default=d.lr, help='peak learning rate')
  g.add_argument('--weight-decay', type=float, default=d.weight_decay,
                 help='decoupled weight decay (adamw, lion)')
  g.add_argument('--warmup-steps', type=int, default=d.warmup_steps,
                 help='linear warmup, in optimizer updates')
  g.add_argument('--schedule', default=d.schedule, choices=list(SCHEDULES),
                 help='cosine decays to lr/10 at --steps')
  g.add_argument('--clip-norm', type=float, default=d.clip_norm,
                 help='global-norm clip of the accumulated mean gradient; 0 disables')
  g.add_argument('--clip-before-accumulation', action='store_true',
                 help='clip each micro-batch mean gradient instead (a different estimator)')
  g.add_argument('--steps', type=int, default=d.steps, help='optimizer updates')
  g = p.add_argument_group('model')
  g.add_argument('--d-model', type=int, default=dm.d_model)
  g.add_argument('--layers', type=int, default=dm.num_layers)
  g.add_argument('--heads', type=int, default=dm.num_heads)
  g.add_argument('--mlp-ratio', type=int, default=dm.mlp_ratio)
  g.add_argument('--max-len', type=int, default=dm.max_len, help='longest sequence allowed')
  g.add_argument('--positions', default=dm.positions, choices=list(POSITIONS))
  g.add_argument('--dropout', type=float, default=dm.dropout)
  g = p.add_argument_group('run')
  g.add_argument('--seed', type=int, default=d.seed)
  g.add_argument('--eval-every', type=int, default=d.eval_every, help='in optimizer updates')
  g.add_argument('--eval-batches', type=int, default=d.eval_batches,
                 help='eval set size, in micro-batches of the eval split')
  g.add_argument('--log-every', type=int, default=d.log_every, help='in optimizer updates')
  g.add_argument('--out', default=None, help='output directory (default runs/train-<time>)')
  g.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                 help='progress bar (default: only on a terminal)')
  g = p.add_argument_group('checkpoints (Orbax, in OUT/checkpoints)')
  g.add_argument('--save-every', type=int, default=d.save_every,
                 help='save every N optimizer updates, and at the end (0: never)')
  g.add_argument('--save-every-micro', type=int, default=d.save_every_micro,
                 help='multisteps/hybrid: also save every M calls, inside a cycle (0: never)')
  g.add_argument('--keep', type=int, default=d.keep, help='checkpoints to keep')
  g.add_argument('--resume', nargs='?', const='latest', default=None, metavar='STEP',
                 help='continue the run in --out from its newest good checkpoint (or STEP, an '
                      'Orbax step = micro-batches done); final params are bit-identical to an '
                      'uninterrupted run')
  g.add_argument('--on-config-change', default='refuse', choices=list(ON_CONFIG_CHANGE),
                 help='when resuming mid-cycle with another batch size/K/mode: refuse '
                      '(default), or flush the partial cycle as its own update first')
  return p.parse_args(argv)


def _k_arg(text: str):
  """--grad-accum-steps: an int, or 'auto'."""
  if text == 'auto':
    return 'auto'
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r}: an integer >= 1, or auto') from None


def config_from_args(a) -> TrainConfig:
  model = ModelConfig(d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                      mlp_ratio=a.mlp_ratio, max_len=a.max_len, positions=a.positions,
                      dropout=a.dropout)
  return TrainConfig(
      data=a.data, seq_len=a.seq_len, pack=a.pack, microbatch_size=a.batch_size,
      grad_accum_steps=a.grad_accum_steps, tokens_per_update=a.tokens_per_update,
      grad_accum_schedule=a.grad_accum_schedule, max_grad_accum_steps=a.max_grad_accum_steps,
      lr_batch_scaling=a.lr_batch_scaling,
      accum_mode=a.accum_mode, microbatches_per_call=a.microbatches_per_call,
      multisteps_impl=a.multisteps_impl, memory_budget=a.memory_budget, mesh=a.mesh,
      dp_reduction=a.dp_reduction, fsdp_reduce=a.fsdp_reduce,
      accumulator_memory=a.accumulator_memory,
      precision=a.precision, nonfinite_policy=a.nonfinite_policy,
      max_consecutive_skips=a.max_consecutive_skips, inject_faults=a.inject_faults,
      optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay,
      warmup_steps=a.warmup_steps, schedule=a.schedule,
      clip_norm=a.clip_norm if a.clip_norm else None,
      clip_before_accumulation=a.clip_before_accumulation, steps=a.steps, model=model,
      seed=a.seed, eval_every=a.eval_every, eval_batches=a.eval_batches,
      log_every=a.log_every, log_microbatches=a.log_microbatches,
      noise_stats=a.noise_stats, save_every=a.save_every,
      save_every_micro=a.save_every_micro, keep=a.keep)


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
    with _Preemption() as preemption:
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
                     '(--accum-mode multisteps or hybrid); the newest committed checkpoint is '
                     'intact.\n')
    return 1
  except OSError as e:  # writing metrics, config.json or the plot failed (disk full, ...)
    sys.stderr.write(f'error: could not write the run\'s outputs: {e}. The newest committed '
                     'checkpoint is intact; --resume continues from it.\n')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
