"""The step that completes an update against a plain optax step, side by side in one process.

    python -m experiments.bench --emit          # writes benchmarks/emit.md (~4 minutes)

The main job's transformer at three sizes (0.9M, 3.3M, 16M params, 16 leaves), float32, AdamW.
The update's sums (or, for optax, the mean gradient) are an *argument* of every program, never
a constant of it (a constant lets XLA fold the division and the skip decision away), and every
program donates the state it changes and is called on its own last result. Timed in interleaved
rounds (every program once per round, in turn); a ratio is the median over rounds of two
programs' times in the same round, with its 25th-75th percentiles where given.

Programs:

- plain optax AdamW: `update` + `apply_updates` on the mean gradient;
- the same, also reporting `optax.global_norm` of the gradient (what a training loop logs);
- `optax.chain(clip_by_global_norm(1.0), adamw)` + apply on the mean gradient;
- a hand-written accumulator's completing call: add the last gradient into the accumulator,
  AdamW on accumulator / weight, then zero the accumulator;
- accumjax's completing program without the gradient (`step.apply_cycle`, state donated):
  scan mode (no cycle between calls), with clip_norm=1.0, and multisteps mode (the call's sums
  added into the cycle, the update, a fresh cycle);
- `accumjax.normalized(adamw)` through the optax interface (`update` + `apply_updates`);
- parts alone, each against the plain step: one squared norm of a gradient-sized tree, one
  `all(isfinite)` check of it (the check the emitting step ran before), zeroing it, adding two.

Bytes per parameter are XLA's cost analysis of each compiled program (a static count; a
`lax.cond`'s branches count whether taken or not).
"""

import os
import statistics
import time

SIZES = [('0.9M', dict(d_model=128, num_layers=4, num_heads=4), 41, 20),
         ('3.3M', dict(d_model=256, num_layers=4, num_heads=4), 21, 10),
         ('16M', dict(d_model=512, num_layers=5, num_heads=8), 11, 5)]
QUICK = [('0.1M', dict(d_model=64, num_layers=2, num_heads=2), 5, 5)]
PLAIN = 'plain optax AdamW'
# (program, reference, goal): the ratios the report leads with
RATIOS = [
    ('accumjax emitting, scan mode', PLAIN, '<= 1.10'),
    ('accumjax emitting, scan mode', 'plain AdamW + global_norm metric', ''),
    ('accumjax emitting, clip_norm=1.0', 'optax clip_by_global_norm + AdamW', ''),
    ('accumjax emitting, multisteps (own cycle)', 'hand-written accumulator, completing call',
     ''),
    ('accumjax emitting, multisteps (own cycle)', PLAIN, ''),
    ('accumjax normalized (optax interface) + apply', PLAIN, ''),
]
PARTS = ['squared norm', 'all(isfinite) check', 'zero a tree', 'add two trees']


def programs(dims) -> tuple[dict, int]:
  """{name: (jitted fn(state, *args) -> state, first state, args)}, and the param count."""
  import jax
  import jax.numpy as jnp
  import optax

  import accumjax
  from accumjax import core, optim
  from accumjax import step as step_lib
  from accumjax.lm import model

  _, params = model.make_lm(model.ModelConfig(max_len=64, **dims))
  keys = iter(jax.random.split(jax.random.key(0), 64))
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape) * 1e-2, params)
  sums = accumjax.GradSums(grads, jnp.float32(100.0), jnp.float32(50.0), jnp.float32(0.0))
  mean = jax.tree.map(lambda g: g / sums.weight, grads)
  adamw = optax.adamw(1e-3)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  out = {}

  def add(name, fn, state, *args):
    out[name] = (jax.jit(fn, donate_argnums=0), copy(state), args)

  def optax_step(tx, metric=False):
    def fn(st, g):
      updates, opt_state = tx.update(g, st[0], st[1])
      new = (opt_state, optax.apply_updates(st[1], updates))
      return new + (optax.global_norm(g),) if metric else new
    return fn

  add(PLAIN, optax_step(adamw), (adamw.init(params), params), mean)
  add('plain AdamW + global_norm metric', lambda st, g: optax_step(adamw, True)(st[:2], g),
      (adamw.init(params), params, jnp.float32(0)), mean)
  clipped = optax.chain(optax.clip_by_global_norm(1.0), adamw)
  add('optax clip_by_global_norm + AdamW', optax_step(clipped), (clipped.init(params), params),
      mean)

  def hand_written(st, g, weight):
    opt_state, p, acc = st
    total = jax.tree.map(jnp.add, acc, g)
    updates, opt_state = adamw.update(jax.tree.map(lambda a: a / weight, total), opt_state, p)
    return opt_state, optax.apply_updates(p, updates), jax.tree.map(jnp.zeros_like, acc)
  add('hand-written accumulator, completing call', hand_written,
      (adamw.init(params), params, jax.tree.map(jnp.zeros_like, params)), grads, sums.weight)

  def emitting(mode, **kw):
    config = accumjax.AccumConfig(num_microbatches=1 if mode == 'scan' else 2,
                                  microbatch_size=1, mode=mode, **kw)
    tx = accumjax.accumulating_optimizer(adamw, config)
    state = accumjax.init_train_state(params, adamw, 0, config)
    if mode == 'scan':
      def fn(st, s):  # the scan-mode program: the call's sums are the update's
        cycle = step_lib.Cycle(s, jnp.ones((), jnp.int32), jnp.full((), -1, jnp.int32))
        return step_lib.apply_cycle(tx, config, st, s, cycle)[0]
    else:
      def fn(st, s):  # multisteps: the last call's sums into the cycle, the update, a new cycle
        return step_lib.apply_cycle(tx, config, st, s, step_lib.add_to_cycle(st.cycle, s, 1))[0]
    return fn, state

  add('accumjax emitting, scan mode', *emitting('scan'), sums)
  add('accumjax emitting, clip_norm=1.0', *emitting('scan', clip_norm=1.0), sums)
  add('accumjax emitting, multisteps (own cycle)', *emitting('multisteps'), sums)
  norm_tx = accumjax.normalized(adamw)
  add('accumjax normalized (optax interface) + apply',
      lambda st, s: (lambda u, o: (o, optax.apply_updates(st[1], u.grads)))(
          *norm_tx.update(s, st[0], optim.as_opt_params(st[1]))),
      (norm_tx.init(optim.as_opt_params(params)), params), sums)
  # the parts, alone (the state is a scalar or the tree itself, so that every call is chained)
  add('squared norm', lambda st, g: st + core._sq_norm(g), jnp.float32(0), grads)
  add('all(isfinite) check', lambda st, g: st | core._all_finite(g), jnp.bool_(False), grads)
  add('zero a tree', lambda st, on: jax.tree.map(
      lambda x: jnp.where(on, jnp.zeros_like(x), x), st), grads, jnp.bool_(True))
  add('add two trees', lambda st, g: jax.tree.map(jnp.add, st, g), grads, grads)
  return out, model.num_params(params)


def _params_after_one_call(name, progs):
  import jax
  import jax.numpy as jnp
  fn, state, args = progs[name]
  out = fn(jax.tree.map(jnp.copy, state), *args)  # (the program donates what it is given)
  return out.params if hasattr(out, 'params') else out[1]


# (program, the program whose params it must reproduce after one call)
SAME_UPDATE = [('accumjax emitting, scan mode', PLAIN),
               ('accumjax emitting, multisteps (own cycle)', PLAIN),
               ('accumjax normalized (optax interface) + apply', PLAIN),
               ('hand-written accumulator, completing call', PLAIN),
               ('accumjax emitting, clip_norm=1.0', 'optax clip_by_global_norm + AdamW')]


def check(progs) -> float:
  """Every update program gives its reference's params after one call (float32 rounding; the
  gradient's norm is above the clip, so the clip is active). Returns the largest error."""
  import jax
  import jax.numpy as jnp
  worst = 0.0
  for name, ref in SAME_UPDATE:
    got, want = _params_after_one_call(name, progs), _params_after_one_call(ref, progs)
    err = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got,
                                           want)))
    if not err <= 1e-6:
      raise AssertionError(f'{name}: params differ from {ref} by {err} after one update')
    worst = max(worst, err)
  return worst


def measure(label, dims, rounds, reps) -> dict:
  import jax

  from experiments.timing import interleaved_times
  progs, n = programs(dims)
  check(progs)
  bytes_per_param, temp, runners = {}, {}, {}
  for name, (fn, state, args) in progs.items():
    compiled = fn.lower(state, *args).compile()
    bytes_per_param[name] = compiled.cost_analysis()['bytes accessed'] / n
    temp[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    holder = [state]

    def call(fn=fn, holder=holder, args=args):
      holder[0] = fn(holder[0], *args)
      return holder[0]
    runners[name] = call
  times = interleaved_times(runners, rounds, reps, warmup=3)
  del jax
  return {'size': label, 'num_params': n, 'rounds': rounds, 'reps': reps,
          'bytes': bytes_per_param, 'temp_mib': temp,
          'rounds_ms': {k: [t * 1e3 for t in v] for k, v in times.items()},
          'ms': {k: statistics.median(v) * 1e3 for k, v in times.items()}}


def passes_over(fn, *args) -> int:
  """The fusions of `fn` compiled for `args` (ShapeDtypeStructs; the first one's shape is "the
  array") that read or write an array of that shape: how many passes over it XLA made."""
  import jax
  text = jax.jit(fn).lower(*args).compile().as_text()
  return passes_in(text, args[0].shape)


def passes_in(hlo: str, shape) -> int:
  """`passes_over`'s count, read from compiled HLO text: the entry computation's fusions whose
  result (a tuple's too, where a backend fuses several outputs) or an operand has `shape`."""
  import re
  entry = hlo[hlo.index('\nENTRY'):]
  entry = entry[:entry.index('\n}')]
  dims = f'[{",".join(map(str, shape))}]'
  big, passes = set(), 0
  for line in entry.splitlines():
    m = re.match(r'\s*(?:ROOT )?(%[\w.-]+) = (\([^=]*?\)|\S+) (\w+)\((.*?)\)', line)
    if not m:
      continue
    name, kind, op, operands = m.groups()
    if dims in re.sub(r'\{[^}]*\}', '', kind):  # layouts dropped
      big.add(name)
    if op == 'fusion' and (name in big or set(re.findall(r'%[\w.-]+', operands)) & big):
      passes += 1
  return passes


def fusion_probe(n: int = 1 << 20) -> int:
  """How many passes XLA compiles `(a + b, sum((a + b)^2))` into, for float32[n] operands: 1
  where the backend fuses a reduction into an element-wise pass (multi-output fusion), 2 where
  the reduction is a pass of its own (then the norm of the update's sums cannot be taken in the
  pass that writes them)."""
  import jax
  import jax.numpy as jnp
  x = jax.ShapeDtypeStruct((n,), jnp.float32)
  return passes_over(lambda a, b: (a + b, jnp.sum(jnp.square(a + b))), x, x)


def report(results, seconds, quick) -> str:
  from experiments.timing import paired
  cmd = 'python -m experiments.bench --emit' + (' --quick' if quick else '')
  head = [f'{a} / {b}' + (f' (goal {g})' if g else '') for a, b, g in RATIOS]
  lines = ['# The step that completes an update vs a plain optax step (side by side, one '
           'process)', '',
           f'Command: `{cmd}` ({seconds / 60:.1f} min, {os.cpu_count()} CPU cores, JAX on CPU, '
           'float32). See `experiments/bench_emit.py` for the programs. Every program takes the '
           'gradient (or the sums) as an argument and donates its state; a ratio is the median '
           'over interleaved rounds of two programs\' times in the same round (25th-75th '
           'percentiles in brackets).', '',
           '| params | rounds x calls | plain AdamW ms | ' + ' | '.join(head) + ' |',
           '|---|---|---|' + '---|' * len(head)]
  for r in results:
    cells = [paired(r, a, b, quartiles=True) for a, b, _ in RATIOS]
    lines.append(f'| {r["size"]} ({r["num_params"]:,}) | {r["rounds"]} x {r["reps"]} | '
                 f'{r["ms"][PLAIN]:.2f} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'Parts alone, each / the plain AdamW step in the same round:', '',
            '| params | ' + ' | '.join(PARTS) + ' |', '|---|' + '---|' * len(PARTS)]
  for r in results:
    lines.append(f'| {r["size"]} | ' + ' | '.join(paired(r, p, PLAIN) for p in PARTS) + ' |')
  names = [k for k in results[0]['ms'] if k not in PARTS]
  lines += ['', 'Milliseconds per call (median over rounds); XLA\'s bytes accessed per '
            'parameter (static) and temp memory (buffers the program allocates on every call), '
            f'at {results[-1]["size"]}:', '',
            '| program | ' + ' | '.join(f'{r["size"]} ms' for r in results) +
            ' | bytes / param | temp MiB |', '|---|' + '---|' * (len(results) + 2)]
  for name in names + PARTS:
    lines.append(f'| {name} | ' + ' | '.join(f'{r["ms"][name]:.2f}' for r in results) +
                 f' | {results[-1]["bytes"][name]:.1f} | {results[-1]["temp_mib"][name]:.1f} |')
  import jax
  passes = fusion_probe()
  lines += ['', 'A gradient-sized add and the squared norm of its result '
            f'(`(a + b, sum((a + b)^2))`, float32[2^20]) compile on this backend '
            f'({jax.default_backend()}) to **{passes} pass' + ('es' if passes != 1 else '') +
            '** over the array (`bench_emit.fusion_probe`)' +
            {1: ': XLA here fuses the reduction into the element-wise pass.',
             0: ': the probe found no fusion over the array in the compiled HLO (unread).'}.get(
                 passes, ': XLA here does not fuse a reduction into an element-wise pass (no '
                 'multi-output fusion), so the squared norm is a read of its own, whatever the '
                 'code around it.')]
  return '\n'.join(lines) + '\n'


def main(quick, out):
  start = time.time()
  results = [measure(*size) for size in (QUICK if quick else SIZES)]
  text = report(results, time.time() - start, quick)
  out.write_text(text)
  return text


def profile(name: str, size: str = '16M', calls: int = 5, top: int = 12) -> list:
  """[(ms per call, op)] of XLA's thunks in one program, from a `jax.profiler` trace of
  `calls` calls after a warm-up: where a program's time goes, op by op."""
  import collections
  import gzip
  import json
  import pathlib
  import tempfile

  import jax
  dims = {label: d for label, d, _, _ in SIZES + QUICK}[size]
  fn, state, args = programs(dims)[0][name]
  holder = [state]
  for _ in range(3):
    holder[0] = fn(holder[0], *args)
  jax.block_until_ready(holder[0])
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for _ in range(calls):
      holder[0] = fn(holder[0], *args)
    jax.block_until_ready(holder[0])
    jax.profiler.stop_trace()
    (trace,) = pathlib.Path(tmp).rglob('*.trace.json.gz')
    events = json.load(gzip.open(trace))
  events = events['traceEvents'] if isinstance(events, dict) else events
  total = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and not e['name'].startswith(('ThunkExecutor', '$', 'Slinky')):
      total[e['name']] += e.get('dur', 0)
  return [(us / calls / 1e3, op) for op, us in total.most_common(top)]


if __name__ == '__main__':
  import argparse
  p = argparse.ArgumentParser(description='Profile one program of the --emit bench, op by op.')
  p.add_argument('--profile', required=True, help='a program name of benchmarks/emit.md')
  p.add_argument('--size', default='16M', choices=[s[0] for s in SIZES + QUICK])
  a = p.parse_args()
  for ms, op in profile(a.profile, a.size):
    print(f'{ms:8.2f} ms/call  {op}')
