"""Training a byte-level language model with accumulation: `train_and_evaluate(cfg, out_dir)`.

The library side of `python -m experiments.train`: builds data, model, optimizer and the one
accumjax train step from a flat `TrainConfig`, runs the loop, writes `config.json`,
`metrics.jsonl` and `loss.png` to `out_dir`, and returns a summary dict. No flag parsing here.
"""

import dataclasses
import json
import math
import pathlib
import time

import jax
import optax

from accumjax import data as data_lib
from accumjax import logs
from accumjax.config import AccumConfig, describe
from accumjax.core import ConfigError
from accumjax.losses import token_cross_entropy
from accumjax.model import ModelConfig, make_lm, num_params
from accumjax.optim import accumulating_optimizer
from accumjax.precision import cast_floats
from accumjax.step import init_train_state, make_train_step

PRECISIONS = {'fp32': 'float32', 'bf16': 'bfloat16'}
OPTIMIZERS = ('adamw', 'sgd', 'lion')
SCHEDULES = ('cosine', 'constant')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of a run; `experiments.train --help` documents each flag."""
  # data
  data: str | None = None
  seq_len: int = 128
  pack: bool = False
  # accumulation
  batch_size: int = 8
  grad_accum_steps: int | None = None
  tokens_per_update: int | None = None
  accum_mode: str = 'scan'
  microbatches_per_call: int | None = None
  precision: str = 'fp32'
  # optimization
  optimizer: str = 'adamw'
  lr: float = 3e-3
  weight_decay: float = 0.1
  warmup_steps: int = 20
  schedule: str = 'cosine'
  clip_norm: float | None = 1.0
  clip_before_accumulation: bool = False
  steps: int = 300
  # model
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  max_len: int = 256
  positions: str = 'rope'
  dropout: float = 0.0
  # run
  seed: int = 0
  eval_every: int = 50
  eval_batches: int = 8
  log_every: int = 10
  log_microbatches: bool = False

  def num_microbatches(self, num_devices: int = 1) -> int:
    """K, from --grad-accum-steps or --tokens-per-update (default 4)."""
    if self.tokens_per_update is None:
      return 4 if self.grad_accum_steps is None else self.grad_accum_steps
    per_mb = self.batch_size * self.seq_len * num_devices
    if self.tokens_per_update <= 0 or self.tokens_per_update % per_mb:
      raise ConfigError(
          f'--tokens-per-update {self.tokens_per_update} is not a positive multiple of '
          f'batch size x seq len x devices = {self.batch_size} x {self.seq_len} x {num_devices} '
          f'= {per_mb}; allowed: {per_mb}, {2 * per_mb}, {4 * per_mb}, ...')
    return self.tokens_per_update // per_mb


def _positive_int(name, value, minimum=1):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f'--{name.replace("_", "-")} {value!r} must be an integer >= {minimum}.')


def validate(cfg: TrainConfig, num_devices: int = 1) -> AccumConfig:
  """Checks every setting; returns the AccumConfig. Raises ConfigError before any work."""
  if cfg.grad_accum_steps is not None and cfg.tokens_per_update is not None:
    raise ConfigError('give --grad-accum-steps or --tokens-per-update, not both.')
  for name in ('batch_size', 'seq_len', 'steps', 'eval_every', 'eval_batches', 'log_every',
               'd_model', 'num_layers', 'num_heads', 'mlp_ratio', 'max_len'):
    _positive_int(name, getattr(cfg, name))
  _positive_int('warmup_steps', cfg.warmup_steps, minimum=0)
  if cfg.grad_accum_steps is not None:
    _positive_int('grad_accum_steps', cfg.grad_accum_steps)
  if cfg.seq_len > cfg.max_len:
    raise ConfigError(
        f'--seq-len {cfg.seq_len} is longer than the model allows (--max-len {cfg.max_len}).')
  if cfg.d_model % cfg.num_heads or (cfg.d_model // cfg.num_heads) % 2:
    raise ConfigError(f'--d-model {cfg.d_model} must split into --heads {cfg.num_heads} '
                      'heads of even size.')
  if not (math.isfinite(cfg.lr) and cfg.lr > 0):
    raise ConfigError(f'--lr {cfg.lr} must be a positive finite number.')
  if not cfg.weight_decay >= 0:
    raise ConfigError(f'--weight-decay {cfg.weight_decay} must be >= 0.')
  if not 0.0 <= cfg.dropout < 1.0:
    raise ConfigError(f'--dropout {cfg.dropout} must be in [0, 1).')
  choices = {'precision': tuple(PRECISIONS), 'optimizer': OPTIMIZERS, 'schedule': SCHEDULES,
             'positions': ('rope', 'learned')}
  for name, allowed in choices.items():
    if getattr(cfg, name) not in allowed:
      raise ConfigError(f'--{name} {getattr(cfg, name)!r}; allowed: {", ".join(allowed)}.')
  if cfg.clip_norm is not None and not cfg.clip_norm > 0:
    raise ConfigError(f'--clip-norm {cfg.clip_norm} must be > 0 (0 or omitted: see --help).')
  k = cfg.num_microbatches(num_devices)
  per_call = cfg.microbatches_per_call
  if cfg.accum_mode == 'hybrid' and per_call is None:
    per_call = k // 2 if k % 2 == 0 else 1
  return AccumConfig(
      num_microbatches=k, microbatch_size=cfg.batch_size, mode=cfg.accum_mode,
      microbatches_per_call=per_call, compute_dtype=PRECISIONS[cfg.precision],
      clip_norm=cfg.clip_norm, clip_before_accumulation=cfg.clip_before_accumulation,
      seq_len=cfg.seq_len, num_devices=num_devices)


def lr_schedule(cfg: TrainConfig):
  if cfg.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
        [cfg.warmup_steps]) if cfg.warmup_steps else optax.constant_schedule(cfg.lr)
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1), cfg.lr * 0.1)


def inner_optimizer(cfg: TrainConfig, schedule):
  if cfg.optimizer == 'adamw':
    return optax.adamw(schedule, b2=0.95, weight_decay=cfg.weight_decay)
  if cfg.optimizer == 'lion':
    return optax.lion(schedule, weight_decay=cfg.weight_decay)
  return optax.sgd(schedule, momentum=0.9)


def model_config(cfg: TrainConfig) -> ModelConfig:
  return ModelConfig(
      vocab_size=data_lib.VOCAB_SIZE, d_model=cfg.d_model, num_layers=cfg.num_layers,
      num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, max_len=cfg.max_len,
      positions=cfg.positions, dropout=cfg.dropout)


def make_loss_fn(apply):
  def loss_fn(params, batch, rng):
    logits = apply(params, batch['inputs'], rng)
    return token_cross_entropy(logits, batch['targets'], batch['mask'])
  return loss_fn


def train_and_evaluate(cfg: TrainConfig, out_dir, log: logs.Logger | None = None) -> dict:
  """Trains `cfg.steps` optimizer updates; returns the summary (also in metrics/config)."""
  log = log or logs.Logger(progress=False)
  accum = validate(cfg)
  train_split, eval_split = data_lib.load_splits(cfg.data, cfg.seq_len, cfg.pack)
  apply, params = make_lm(model_config(cfg), seed=cfg.seed)
  loss_fn = make_loss_fn(apply)
  schedule = lr_schedule(cfg)
  tx = accumulating_optimizer(inner_optimizer(cfg, schedule), accum)
  state = init_train_state(params, tx, jax.random.key(cfg.seed))
  train_step = jax.jit(make_train_step(loss_fn, tx, accum), donate_argnums=0)

  compute_dtype = accum.compute_jnp_dtype

  @jax.jit
  def eval_sums(params, batch):
    logits = apply(cast_floats(params, compute_dtype), batch['inputs'])
    return token_cross_entropy(logits, batch['targets'], batch['mask'])

  eval_set = data_lib.eval_batches(eval_split, cfg.batch_size, cfg.eval_batches)

  def evaluate(params):
    sums = [jax.device_get(eval_sums(params, b)) for b in eval_set]
    loss_sum = sum(float(s) for s, _ in sums)
    weight = sum(float(w) for _, w in sums)
    return loss_sum / weight

  rows = data_lib.RowIterator(train_split, cfg.seed)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  setup = describe(accum)
  info = {
      'devices': [str(d) for d in jax.devices()], 'num_params': num_params(params),
      'data': cfg.data or f'python stdlib sources ({data_lib.default_corpus_files()[0].parent})',
      'train_files': train_split.num_files, 'train_bytes': train_split.num_bytes,
      'train_rows': int(len(train_split.lengths)), 'eval_files': eval_split.num_files,
      'eval_rows_used': len(eval_set) * cfg.batch_size,
  }
  (out / 'config.json').write_text(json.dumps(
      {'train': dataclasses.asdict(cfg), 'accumulation': setup, 'run': info}, indent=2))
  metrics_path = out / 'metrics.jsonl'
  metrics_path.unlink(missing_ok=True)
  writer = logs.MetricsWriter(metrics_path)

  log.table('accumjax train', [
      ('device(s)', ', '.join(info['devices'])),
      ('model', f'{info["num_params"]:,} params, d_model {cfg.d_model}, {cfg.num_layers} layers, '
                f'{cfg.num_heads} heads, {cfg.positions} positions, dropout {cfg.dropout}'),
      ('data', f'{info["data"]}: {train_split.num_files} train files '
               f'({train_split.num_bytes / 1e6:.1f} MB, {len(train_split.lengths):,} rows), '
               f'{eval_split.num_files} eval files'),
      ('micro-batch', f'{accum.microbatch_size} x {cfg.seq_len} tokens'),
      ('K (micro-batches/update)', accum.num_microbatches),
      ('effective batch', f'{accum.microbatch_size} x {accum.num_microbatches} x '
                          f'{accum.num_devices} device(s) = {accum.effective_batch} sequences'),
      ('tokens per update', f'{setup["tokens_per_update"]:,} (incl. padding)'),
      ('mode', f'{accum.mode} ({accum.per_call} micro-batch(es) per call, '
               f'{accum.calls_per_update} call(s) per update)'),
      ('precision', f'{cfg.precision} compute, float32 params/accumulation'),
      ('optimizer', f'{cfg.optimizer}, lr {cfg.lr:g}, clip {setup["clipping"]}'),
      ('schedule', f'{cfg.schedule}, {cfg.warmup_steps} warmup updates, {cfg.steps} updates'),
      ('out', str(out)),
  ])

  records, ema, tokens_seen, train_time = [], None, 0.0, 0.0
  window_tokens, window_start = 0.0, time.perf_counter()
  last_eval = None
  start = time.perf_counter()
  log.start_progress(cfg.steps)
  for update in range(1, cfg.steps + 1):
    t0 = time.perf_counter()
    for call in range(1, accum.calls_per_update + 1):
      state, m = train_step(state, rows.next_rows(accum.per_call * accum.microbatch_size))
      if cfg.log_microbatches:
        log.info(f'update [{update}/{cfg.steps}] accum {call * accum.per_call}/'
                 f'{accum.num_microbatches} call loss {float(m["call_loss"]):.4f} '
                 f'tokens {float(m["call_weight"]):.0f} cycle loss {float(m["loss"]):.4f}')
    m = jax.device_get(m)
    train_time += time.perf_counter() - t0
    loss, weight = float(m['loss']), float(m['weight'])
    if not math.isfinite(loss):
      raise FloatingPointError(f'non-finite loss {loss} at update {update}.')
    ema = loss if ema is None else 0.9 * ema + 0.1 * loss
    tokens_seen += weight
    window_tokens += weight
    record = {'kind': 'train', 'update': update, 'loss': loss, 'ema': ema,
              'lr': float(schedule(update - 1)), 'grad_norm': float(m['grad_norm']),
              'tokens': tokens_seen, 'update_tokens': weight, 'skipped': bool(m['skipped']),
              'time': time.perf_counter() - start}
    records.append(record)
    writer.write(record)
    log.advance()
    if update % cfg.log_every == 0 or update == cfg.steps:
      now = time.perf_counter()
      tok_s = window_tokens / (now - window_start)
      window_tokens, window_start = 0.0, now
      log.info(logs.update_line(update, cfg.steps, loss, ema, record['lr'],
                                accum.num_microbatches, accum.num_microbatches, tok_s,
                                record['grad_norm']))
    if update % cfg.eval_every == 0 or update == cfg.steps:
      eval_loss = evaluate(state.params)
      last_eval = {'kind': 'eval', 'update': update, 'loss': eval_loss,
                   'perplexity': math.exp(eval_loss), 'tokens': tokens_seen}
      records.append(last_eval)
      writer.write(last_eval)
      log.info(f'eval   [{update}/{cfg.steps}] loss {eval_loss:.4f} '
               f'ppl {math.exp(eval_loss):.2f}')
      window_start = time.perf_counter()  # eval time is not training throughput
  log.close()
  wall = time.perf_counter() - start
  fp = logs.fingerprint(state.params)
  summary = {
      'kind': 'summary', 'updates': cfg.steps, 'final_train_loss': loss,
      'final_train_ema': ema, 'final_eval_loss': last_eval['loss'],
      'final_eval_perplexity': last_eval['perplexity'], 'tokens_seen': tokens_seen,
      'wall_time_s': wall, 'train_tokens_per_s': tokens_seen / train_time,
      'first_train_loss': records[0]['loss'], 'params_fingerprint': fp,
  }
  writer.write(summary)
  writer.close()
  logs.plot_losses(records, out / 'loss.png',
                   title=f'{accum.mode}, K={accum.num_microbatches}, '
                         f'{setup["tokens_per_update"]:,} tokens/update, {cfg.precision}')
  log.table('summary', [
      ('updates', cfg.steps),
      ('train loss (first -> last)', f'{summary["first_train_loss"]:.4f} -> '
                                     f'{summary["final_train_loss"]:.4f} (ema {ema:.4f})'),
      ('eval loss / perplexity', f'{summary["final_eval_loss"]:.4f} / '
                                 f'{summary["final_eval_perplexity"]:.2f}'),
      ('tokens seen (real, unpadded)', f'{tokens_seen:,.0f}'),
      ('wall time', f'{wall:.1f} s'),
      ('train tokens/s', f'{summary["train_tokens_per_s"]:,.0f}'),
      ('params fingerprint', fp),
      ('outputs', f'{out / "metrics.jsonl"}, {out / "config.json"}, {out / "loss.png"}'),
  ])
  return summary
