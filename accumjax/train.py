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
import jax.numpy as jnp
import optax

from accumjax import data as data_lib
from accumjax import logs
from accumjax.checkpoint import Checkpointer
from accumjax.config import AccumConfig, describe
from accumjax.core import ConfigError
from accumjax.losses import token_cross_entropy
from accumjax.model import ModelConfig, make_lm, num_params
from accumjax.optim import accumulating_optimizer, as_opt_params
from accumjax.planner import Plan, compiled_memory, format_bytes, parse_bytes, plan_microbatch
from accumjax.precision import cast_floats
from accumjax.step import init_train_state, make_flush, make_train_step

PRECISIONS = {'fp32': 'float32', 'bf16': 'bfloat16'}
# What may change when a run is resumed. Settings that only change what is logged or saved:
HARMLESS = ('eval_every', 'eval_batches', 'log_every', 'log_microbatches', 'save_every',
            'save_every_micro', 'keep', 'steps', 'multisteps_impl', 'memory_budget')
# The shape of an update: safe to change between cycles, never inside one without a policy.
ACCUMULATION = ('batch_size', 'grad_accum_steps', 'tokens_per_update', 'accum_mode',
                'microbatches_per_call')
ON_CONFIG_CHANGE = ('refuse', 'flush')
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
  multisteps_impl: str = 'lazy'
  memory_budget: str | None = None
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
  # checkpoints (0 disables)
  save_every: int = 100
  save_every_micro: int = 0
  keep: int = 3

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
               'd_model', 'num_layers', 'num_heads', 'mlp_ratio', 'max_len', 'keep'):
    _positive_int(name, getattr(cfg, name))
  for name in ('warmup_steps', 'save_every', 'save_every_micro'):
    _positive_int(name, getattr(cfg, name), minimum=0)
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
      seq_len=cfg.seq_len, num_devices=num_devices, multisteps_impl=cfg.multisteps_impl)


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


def plan_for_budget(cfg: TrainConfig) -> tuple[TrainConfig, Plan]:
  """Resolves --memory-budget: the largest micro-batch whose compiled train step fits, and the
  K that reaches --tokens-per-update. Returns the config with batch_size and K set."""
  if cfg.tokens_per_update is None or cfg.grad_accum_steps is not None:
    raise ConfigError('--memory-budget needs --tokens-per-update N (and no --grad-accum-steps): '
                      'it chooses the micro-batch size and K itself.')
  if cfg.tokens_per_update <= 0 or cfg.tokens_per_update % cfg.seq_len:
    raise ConfigError(f'--tokens-per-update {cfg.tokens_per_update} must be a positive multiple '
                      f'of --seq-len {cfg.seq_len}.')
  budget = parse_bytes(cfg.memory_budget)
  validate(dataclasses.replace(cfg, batch_size=1))
  apply, params = make_lm(model_config(cfg), seed=cfg.seed)
  loss_fn = make_loss_fn(apply)

  def resolved(b, k):
    return dataclasses.replace(cfg, batch_size=b, grad_accum_steps=k, tokens_per_update=None)

  def step_memory(b, k):
    c = resolved(b, k)
    accum = validate(c)
    tx = _optimizer(c, accum)[0]
    state = jax.eval_shape(lambda p: init_train_state(p, tx, 0), params)
    rows = accum.per_call * b
    batch = {'inputs': jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32),
             'targets': jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32),
             'mask': jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.float32)}
    step = jax.jit(make_train_step(loss_fn, tx, accum), donate_argnums=0)
    return compiled_memory(step, state, batch)['total']

  plan = plan_microbatch(step_memory, budget, cfg.tokens_per_update // cfg.seq_len)
  return resolved(plan.microbatch_size, plan.num_microbatches), plan


def _optimizer(cfg: TrainConfig, accum: AccumConfig):
  schedule = lr_schedule(cfg)
  return accumulating_optimizer(inner_optimizer(cfg, schedule), accum), schedule


def compare_configs(saved: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
  """(changed accumulation fields, changed fields that change the math) between runs.

  Harmless fields (logging, eval, saving, --steps) may always change. Everything else that is
  not an accumulation field (model, data, seed, precision, optimizer, schedule...) changes what
  the resumed run computes, so it is refused.
  """
  new = dataclasses.asdict(cfg)
  unknown = sorted(set(saved) - set(new))
  if unknown:
    raise ConfigError(f'the checkpoint was written with unknown settings {unknown}.')
  changed = [k for k in new if k in saved and saved[k] != new[k] and k not in HARMLESS]
  return ([k for k in changed if k in ACCUMULATION],
          [k for k in changed if k not in ACCUMULATION])


def _describe_change(saved: dict, cfg: TrainConfig, fields) -> str:
  new = dataclasses.asdict(cfg)
  return ', '.join(f'--{k.replace("_", "-")} {saved[k]!r} -> {new[k]!r}' for k in fields)


def _convert_opt_state(state, old_tx, tx, params):
  """Moves a cycle-boundary optimizer state between accumulation setups (scan <-> MultiSteps,
  other K): the inner optimizer state carries over, the (empty) accumulator is rebuilt."""
  old = state.opt_state
  inner = old.inner_opt_state if isinstance(old, optax.MultiStepsState) else old
  new = tx.init(as_opt_params(params))
  if isinstance(new, optax.MultiStepsState):
    new = new._replace(inner_opt_state=inner, gradient_step=jnp.copy(state.update_step))
  else:
    new = inner
  return state._replace(opt_state=new)


def _resume(ckpt: Checkpointer, step, cfg, accum, tx, params, on_config_change, log):
  """Restores the newest good checkpoint and reconciles its config with `cfg`."""

  def target(meta):
    accum_fields, math_fields = compare_configs(meta['config'], cfg)
    if math_fields:
      raise ConfigError(
          f'cannot resume from step {meta["step"]} with a different '
          f'{_describe_change(meta["config"], cfg, math_fields)}: it changes what the run '
          'computes. Resume with the saved values, or start a new run in another --out.')
    old_cfg = TrainConfig(**meta['config'])
    return init_train_state(params, _optimizer(old_cfg, validate(old_cfg))[0], cfg.seed)

  restored = ckpt.restore(target, step=None if step in (None, True, 'latest') else int(step))
  for s, why in restored.skipped:
    log.info(f'resume: skipped checkpoint {s}: {why}')
  state, meta = restored.state, restored.meta
  saved = meta['config']
  accum_fields, _ = compare_configs(saved, cfg)
  old_cfg = TrainConfig(**saved)
  old_accum = validate(old_cfg)
  old_tx = _optimizer(old_cfg, old_accum)[0]
  where = (f'update {int(state.update_step)}, {int(state.cycle_microbatch)}/'
           f'{old_accum.num_microbatches} micro-batches into the next')
  log.info(f'resume: checkpoint {restored.step} ({where}) from {ckpt.path(restored.step)}')
  shape = lambda a: (a.num_microbatches, a.microbatch_size, a.mode, a.per_call)
  if accum_fields and shape(old_accum) != shape(accum):
    change = _describe_change(saved, cfg, accum_fields)
    if int(state.cycle_microbatch) > 0:
      if on_config_change != 'flush':
        raise ConfigError(
            f'checkpoint {restored.step} is mid-cycle ({where}); changing {change} now would '
            'mix two accumulation setups in one update. Resume with the saved values, or pass '
            '--on-config-change flush to apply the partial cycle as its own update first.')
      state = jax.jit(make_flush(old_tx))(state)
      log.info(f'resume: flushed the partial cycle as update {int(state.update_step)} '
               f'(exact for the micro-batches it had) before changing {change}')
    state = _convert_opt_state(state, old_tx, tx, params)
    log.info(f'resume: accumulation changed at a cycle boundary: {change}')
  return state, meta


def _trim_metrics(path: pathlib.Path, update: int) -> list[dict]:
  """Keeps the records up to `update` (a crash may have logged updates after the checkpoint)."""
  if not path.exists():
    return []
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  records = [r for r in records if r['kind'] != 'summary' and r['update'] <= update]
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return records


def train_and_evaluate(cfg: TrainConfig, out_dir, log: logs.Logger | None = None, *,
                       resume=None, on_config_change: str = 'refuse',
                       should_stop=lambda: False) -> dict:
  """Trains until `cfg.steps` optimizer updates; returns the summary.

  Args:
    cfg: the run's settings.
    out_dir: where config.json, metrics.jsonl, loss.png and checkpoints/ go.
    log: a logs.Logger (default: plain prints, no progress bar).
    resume: None (fresh run), True or 'latest' (newest good checkpoint in out_dir), or a step.
    on_config_change: 'refuse' (default) or 'flush': what to do when the accumulation setup
      changed and the checkpoint is mid-cycle (flush applies the partial cycle first).
    should_stop: polled after every call; when it returns True (a preemption signal), the run
      saves a checkpoint where it is (mid-cycle included) and returns with 'preempted': True.
  """
  log = log or logs.Logger(progress=False)
  plan = None
  if cfg.memory_budget is not None:
    cfg, plan = plan_for_budget(cfg)
  accum = validate(cfg)
  if on_config_change not in ON_CONFIG_CHANGE:
    raise ConfigError(f'on_config_change={on_config_change!r}; allowed: refuse, flush.')
  out = pathlib.Path(out_dir)
  if resume is not None and not (out / 'checkpoints').is_dir():
    raise ConfigError(f'--resume: no checkpoints/ in {out} to resume from.')
  train_split, eval_split = data_lib.load_splits(cfg.data, cfg.seq_len, cfg.pack)
  apply, params = make_lm(model_config(cfg), seed=cfg.seed)
  loss_fn = make_loss_fn(apply)
  tx, schedule = _optimizer(cfg, accum)
  saving = bool(cfg.save_every or cfg.save_every_micro)
  ckpt = Checkpointer(out / 'checkpoints', keep=cfg.keep) if saving or resume is not None \
      else None  # created on demand if a run without saves is preempted
  rows = data_lib.RowIterator(train_split, cfg.seed)
  run = {'ema': None, 'tokens_seen': 0.0, 'train_time': 0.0, 'last_eval': None}
  if resume is not None:
    state, meta = _resume(ckpt, resume, cfg, accum, tx, params, on_config_change, log)
    rows.set_state(meta['data'])
    run = meta['run']
  else:
    state = init_train_state(params, tx, cfg.seed)
  train_step = jax.jit(make_train_step(loss_fn, tx, accum), donate_argnums=0,
                       static_argnames='last_call')
  compute_dtype = accum.compute_jnp_dtype

  @jax.jit
  def eval_sums(params, batch):
    logits = apply(cast_floats(params, compute_dtype), batch['inputs'])
    return token_cross_entropy(logits, batch['targets'], batch['mask'])

  eval_set = data_lib.eval_batches(eval_split, cfg.batch_size, cfg.eval_batches)

  def evaluate(params):
    sums = [jax.device_get(eval_sums(params, b)) for b in eval_set]
    return sum(float(s) for s, _ in sums) / sum(float(w) for _, w in sums)

  update = int(state.update_step)
  calls_done = int(state.cycle_microbatch) // accum.per_call
  microbatches = int(state.microbatch_step)
  out.mkdir(parents=True, exist_ok=True)
  setup = describe(accum)
  info = {
      'memory_plan': dataclasses.asdict(plan) if plan else None,
      'devices': [str(d) for d in jax.devices()], 'num_params': num_params(params),
      'data': cfg.data or f'python stdlib sources ({data_lib.default_corpus_files()[0].parent})',
      'train_files': train_split.num_files, 'train_bytes': train_split.num_bytes,
      'train_rows': int(len(train_split.lengths)), 'eval_files': eval_split.num_files,
      'eval_rows_used': len(eval_set) * cfg.batch_size, 'resumed_at_update': update,
  }
  (out / 'config.json').write_text(json.dumps(
      {'train': dataclasses.asdict(cfg), 'accumulation': setup, 'run': info}, indent=2))
  metrics_path = out / 'metrics.jsonl'
  records = _trim_metrics(metrics_path, update) if resume is not None else []
  if resume is None:
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
      ('checkpoints', f'every {cfg.save_every} updates' + (
          f' and every {cfg.save_every_micro} calls' if cfg.save_every_micro else '')
          + f', keep {cfg.keep}' if saving else 'off'),
      *([('memory plan', f'budget {format_bytes(plan.budget_bytes)}: micro-batch '
                          f'{plan.microbatch_size} x K {plan.num_microbatches}, compiled step '
                          f'{format_bytes(plan.predicted_bytes)} (tried: ' + ', '.join(
                              f'{b}: {format_bytes(n)}' for b, n in plan.tried) + ')')]
        if plan else []),
      ('out', str(out)),
  ])

  last_saved = [None]

  def save():
    nonlocal ckpt
    if ckpt is None:
      ckpt = Checkpointer(out / 'checkpoints', keep=cfg.keep)
    if last_saved[0] != microbatches:  # e.g. a preemption right after a periodic save
      meta = {'config': dataclasses.asdict(cfg), 'data': rows.state(), 'run': run,
              'update': update}
      last_saved[0] = ckpt.save(state, meta)
    return ckpt.path(last_saved[0])

  def preempted():
    path = save()
    ckpt.wait()
    writer.close()
    log.close()
    log.info(f'preempted: checkpoint written to {path} (update {update}, '
             f'{calls_done * accum.per_call}/{accum.num_microbatches} micro-batches into the '
             f'next); continue with --resume')
    return {'kind': 'preempted', 'update': update, 'checkpoint': str(path), 'preempted': True}

  def _loop():
    nonlocal state, update, calls_done, microbatches
    window_tokens, window_start = 0.0, time.perf_counter()
    log.start_progress(cfg.steps, initial=update)
    while update < cfg.steps:
      t0 = time.perf_counter()
      while calls_done < accum.calls_per_update:
        state, m = train_step(state, rows.next_rows(accum.per_call * accum.microbatch_size),
                              last_call=calls_done + 1 == accum.calls_per_update)
        calls_done += 1
        microbatches += accum.per_call
        if cfg.log_microbatches:
          log.info(f'update [{update + 1}/{cfg.steps}] accum {calls_done * accum.per_call}/'
                   f'{accum.num_microbatches} call loss {float(m["call_loss"]):.4f} '
                   f'tokens {float(m["call_weight"]):.0f} cycle loss {float(m["loss"]):.4f}')
        if calls_done < accum.calls_per_update:  # mid-cycle
          if cfg.save_every_micro and (microbatches // accum.per_call) % \
              cfg.save_every_micro == 0:
            save()
          if should_stop():
            return preempted()
      calls_done = 0
      update += 1
      m = jax.device_get(m)
      run['train_time'] += time.perf_counter() - t0
      loss, weight = float(m['loss']), float(m['weight'])
      if not math.isfinite(loss):
        raise FloatingPointError(f'non-finite loss {loss} at update {update}.')
      run['ema'] = loss if run['ema'] is None else 0.9 * run['ema'] + 0.1 * loss
      run['tokens_seen'] += weight
      window_tokens += weight
      record = {'kind': 'train', 'update': update, 'loss': loss, 'ema': run['ema'],
                'lr': float(schedule(update - 1)), 'grad_norm': float(m['grad_norm']),
                'tokens': run['tokens_seen'], 'update_tokens': weight,
                'skipped': bool(m['skipped']), 'time': time.perf_counter() - start}
      records.append(record)
      writer.write(record)
      log.advance()
      if update % cfg.log_every == 0 or update == cfg.steps:
        now = time.perf_counter()
        tok_s = window_tokens / (now - window_start)
        window_tokens, window_start = 0.0, now
        log.info(logs.update_line(update, cfg.steps, loss, run['ema'], record['lr'],
                                  accum.num_microbatches, accum.num_microbatches, tok_s,
                                  record['grad_norm']))
      if update % cfg.eval_every == 0 or update == cfg.steps:
        eval_loss = evaluate(state.params)
        run['last_eval'] = {'kind': 'eval', 'update': update, 'loss': eval_loss,
                            'perplexity': math.exp(eval_loss), 'tokens': run['tokens_seen']}
        records.append(run['last_eval'])
        writer.write(run['last_eval'])
        log.info(f'eval   [{update}/{cfg.steps}] loss {eval_loss:.4f} '
                 f'ppl {math.exp(eval_loss):.2f}')
        window_start = time.perf_counter()  # eval time is not training throughput
      saved_now = bool(saving and (
          (cfg.save_every and update % cfg.save_every == 0) or update == cfg.steps))
      if saved_now:
        save()
      if should_stop() and update < cfg.steps:
        return preempted()
  start = time.perf_counter()
  try:
    stopped = _loop()
    if ckpt:
      ckpt.wait()  # surfaces a failed background save as an error here
  finally:
    if ckpt:
      ckpt.close()
  if stopped is not None:
    return stopped
  log.close()
  if run['last_eval'] is None or run['last_eval']['update'] != update:
    eval_loss = evaluate(state.params)
    run['last_eval'] = {'kind': 'eval', 'update': update, 'loss': eval_loss,
                        'perplexity': math.exp(eval_loss), 'tokens': run['tokens_seen']}
  wall = time.perf_counter() - start
  fp = logs.fingerprint(state.params)
  train_records = [r for r in records if r['kind'] == 'train']
  summary = {
      'kind': 'summary', 'updates': update,
      'final_train_loss': train_records[-1]['loss'] if train_records else float('nan'),
      'final_train_ema': run['ema'], 'final_eval_loss': run['last_eval']['loss'],
      'final_eval_perplexity': run['last_eval']['perplexity'],
      'tokens_seen': run['tokens_seen'], 'wall_time_s': wall,
      'train_tokens_per_s': run['tokens_seen'] / max(run['train_time'], 1e-9),
      'first_train_loss': train_records[0]['loss'] if train_records else float('nan'),
      'params_fingerprint': fp, 'preempted': False,
  }
  writer.write(summary)
  writer.close()
  logs.plot_losses(records, out / 'loss.png',
                   title=f'{accum.mode}, K={accum.num_microbatches}, '
                         f'{setup["tokens_per_update"]:,} tokens/update, {cfg.precision}')
  log.table('summary', [
      ('updates', update),
      ('train loss (first -> last)', f'{summary["first_train_loss"]:.4f} -> '
                                     f'{summary["final_train_loss"]:.4f} '
                                     f'(ema {run["ema"]:.4f})'),
      ('eval loss / perplexity', f'{summary["final_eval_loss"]:.4f} / '
                                 f'{summary["final_eval_perplexity"]:.2f}'),
      ('tokens seen (real, unpadded)', f'{run["tokens_seen"]:,.0f}'),
      ('wall time' + (' (this process)' if resume is not None else ''), f'{wall:.1f} s'),
      ('train tokens/s', f'{summary["train_tokens_per_s"]:,.0f}'),
      ('params fingerprint', fp),
      ('outputs', f'{out / "metrics.jsonl"}, {out / "config.json"}, {out / "loss.png"}'),
  ])
  return summary
