"""Main job: train a byte-level transformer LM on real text with gradient accumulation.

    python -m experiments.train                       # defaults: ~3 minutes on 2 CPU cores

Data: by default the Python standard library's own sources (no download; see accumjax.data).
Defaults: 0.86M-param model, micro-batch 8 x 128 tokens, K=4 (4,096 tokens per update, scan
mode), AdamW 3e-3 with cosine decay, 300 updates. Expect the train loss to fall from ~5.6
(uniform over 258 bytes) to about 1.6 and eval perplexity near 5.
Writes metrics.jsonl, config.json and loss.png to --out (default runs/train-<time>).
The logic lives in accumjax.train, importable from a notebook.
"""

import argparse
import sys
import time

from accumjax.core import ConfigError
from accumjax.data import DataError
from accumjax.logs import Logger
from accumjax.train import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig, train_and_evaluate


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one clear line, not usage + traceback
    sys.stderr.write(f'error: {message} (see --help)\n')
    sys.exit(2)


def parse_args(argv=None):
  d = TrainConfig()
  p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group('data')
  g.add_argument('--data', default=None, help='text file or directory of text files '
                 '(default: the Python standard library sources)')
  g.add_argument('--seq-len', type=int, default=d.seq_len, help='tokens per example')
  g.add_argument('--pack', action='store_true', help='pack examples into full rows (no padding)')
  g = p.add_argument_group('accumulation')
  g.add_argument('--batch-size', type=int, default=d.batch_size,
                 help='micro-batch size (sequences per micro-batch, per device)')
  g.add_argument('--grad-accum-steps', type=int, default=None,
                 help='K, micro-batches per optimizer update (default 4)')
  g.add_argument('--tokens-per-update', type=int, default=None,
                 help='sets K = N / (batch size x seq len x devices); must divide')
  g.add_argument('--accum-mode', default=d.accum_mode, choices=['scan', 'multisteps', 'hybrid'],
                 help='scan: one call per update; multisteps: one call per micro-batch '
                      '(optax.MultiSteps); hybrid: c micro-batches per call')
  g.add_argument('--microbatches-per-call', type=int, default=None,
                 help='c for hybrid mode (default K/2 for even K, else 1)')
  g.add_argument('--precision', default=d.precision, choices=list(PRECISIONS),
                 help='compute precision; params and accumulation stay float32')
  g.add_argument('--log-microbatches', action='store_true',
                 help='also log every call (per-micro-batch view: accum 3/4)')
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
  g.add_argument('--d-model', type=int, default=d.d_model)
  g.add_argument('--layers', type=int, default=d.num_layers)
  g.add_argument('--heads', type=int, default=d.num_heads)
  g.add_argument('--mlp-ratio', type=int, default=d.mlp_ratio)
  g.add_argument('--max-len', type=int, default=d.max_len, help='longest sequence allowed')
  g.add_argument('--positions', default=d.positions, choices=['rope', 'learned'])
  g.add_argument('--dropout', type=float, default=d.dropout)
  g = p.add_argument_group('run')
  g.add_argument('--seed', type=int, default=d.seed)
  g.add_argument('--eval-every', type=int, default=d.eval_every, help='in optimizer updates')
  g.add_argument('--eval-batches', type=int, default=d.eval_batches,
                 help='eval set size, in micro-batches of the eval split')
  g.add_argument('--log-every', type=int, default=d.log_every, help='in optimizer updates')
  g.add_argument('--out', default=None, help='output directory (default runs/train-<time>)')
  g.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                 help='progress bar (default: only on a terminal)')
  return p.parse_args(argv)


def config_from_args(a) -> TrainConfig:
  return TrainConfig(
      data=a.data, seq_len=a.seq_len, pack=a.pack, batch_size=a.batch_size,
      grad_accum_steps=a.grad_accum_steps, tokens_per_update=a.tokens_per_update,
      accum_mode=a.accum_mode, microbatches_per_call=a.microbatches_per_call,
      precision=a.precision, optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay,
      warmup_steps=a.warmup_steps, schedule=a.schedule,
      clip_norm=a.clip_norm if a.clip_norm else None,
      clip_before_accumulation=a.clip_before_accumulation, steps=a.steps, d_model=a.d_model,
      num_layers=a.layers, num_heads=a.heads, mlp_ratio=a.mlp_ratio, max_len=a.max_len,
      positions=a.positions, dropout=a.dropout, seed=a.seed, eval_every=a.eval_every,
      eval_batches=a.eval_batches, log_every=a.log_every, log_microbatches=a.log_microbatches)


def main(argv=None):
  args = parse_args(argv)
  out = args.out or time.strftime('runs/train-%Y%m%d-%H%M%S')
  try:
    cfg = config_from_args(args)
    train_and_evaluate(cfg, out, Logger(progress=args.progress))
  except (ConfigError, DataError) as e:
    sys.stderr.write(f'error: {e}\n')
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
