"""The accumulation core against the code it replaces, side by side in one process.

    python -m experiments.bench --core          # writes benchmarks/core.md (~3 minutes)

One gradient of (sum of weighted per-row losses) / (total weight) over K = 8 micro-batches, an
MLP on rows with uneven per-row weights (0 to 3), float32, jitted once each, timed in
interleaved rounds (every variant once per round, in turn, so load on this shared machine falls
on all alike); a ratio is the median over rounds of two variants' times in the same round:

- accumjax: `accumulate_gradients` (each micro-batch's gradient checked and masked, as the
  'skip_microbatch' policy needs), and `accumulate_gradients(mask_microbatches=False)` (the
  default policy's path: scalars checked per micro-batch, the gradient sum once per update);
- a hand-written `lax.scan` adding each micro-batch's gradient of its loss sum into a carry,
  divided once (MaxText's shape);
- `optax.microbatching.micro_grad` of the loss sum (SUM accumulation), divided once;
- the full batch: `jax.grad` of the whole batch's weighted mean, no micro-batches.
"""

import os
import statistics
import time

K = 8
SIZES = {'small': dict(width=128, layers=4, rows=2048),
         'medium': dict(width=512, layers=6, rows=4096),
         'large': dict(width=1024, layers=6, rows=2048)}
QUICK = {'tiny': dict(width=32, layers=2, rows=256)}


def _problem(width, layers, rows):
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0), layers + 3)
  params = {f'w{i}': jax.random.normal(keys[i], (width, width)) / jnp.sqrt(width)
            for i in range(layers)}
  params['out'] = jax.random.normal(keys[layers], (width, 1)) / jnp.sqrt(width)
  batch = {'x': jax.random.normal(keys[-2], (rows, width)),
           'y': jax.random.normal(keys[-1], (rows, 1)),
           'w': (jnp.arange(rows) % 4).astype(jnp.float32)}

  def loss_fn(p, b, rng=None):
    del rng
    h = b['x']
    for i in range(layers):
      h = jnp.tanh(h @ p[f'w{i}'])
    per_row = jnp.sum((h @ p['out'] - b['y']) ** 2, axis=-1)
    return jnp.sum(per_row * b['w']), jnp.sum(b['w'])
  return params, batch, loss_fn


def variants(params, batch, loss_fn) -> dict:
  """name -> a jitted `() -> (grads, loss)`, all computing the same thing."""
  import jax
  import jax.numpy as jnp
  import optax

  import accumjax

  def accum(mask):
    @jax.jit
    def run(p, b):
      g, m = accumjax.accumulate_gradients(loss_fn, p, b, num_microbatches=K,
                                           mask_microbatches=mask)
      return g, m['loss']
    return run

  @jax.jit
  def hand_scan(p, b):
    mbs = jax.tree.map(lambda x: x.reshape(K, x.shape[0] // K, *x.shape[1:]), b)

    def body(carry, mb):
      g_acc, l_acc, w_acc = carry
      (loss, weight), g = jax.value_and_grad(loss_fn, has_aux=True)(p, mb)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, w_acc + weight), None
    zeros = jax.tree.map(jnp.zeros_like, p)
    (g, loss, weight), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), mbs)
    return jax.tree.map(lambda x: x / weight, g), loss / weight

  @jax.jit
  def optax_micro(p, b):
    fn = optax.microbatching.micro_grad(
        lambda p, b: loss_fn(p, b), has_aux=True, microbatch_size=b['w'].shape[0] // K)
    g, aux = fn(p, b)  # aux.aux: the weights, per micro-batch
    weight = jnp.sum(aux.aux)
    return jax.tree.map(lambda x: x / weight, g), jnp.sum(aux.values) / weight

  @jax.jit
  def full(p, b):
    def mean(p):
      s, w = loss_fn(p, b)
      return s / w
    loss, g = jax.value_and_grad(mean)(p)
    return g, loss

  fns = {'accumjax core (masks each micro-batch)': accum(True),
         'accumjax core (one check per update)': accum(False),
         'hand-written scan': hand_scan, 'optax.microbatching': optax_micro,
         'full batch': full}
  return {name: (lambda f=f: f(params, batch)) for name, f in fns.items()}


def check_equal(fns: dict):
  """Every variant gives the full batch's gradient (float32 rounding)."""
  import jax
  import numpy as np
  want = fns['full batch']()[0]
  for name, fn in fns.items():
    got = fn()[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=name)


def measure(label, dims, rounds, reps):
  import jax

  from experiments.timing import interleaved_times
  params, batch, loss_fn = _problem(**dims)
  fns = variants(params, batch, loss_fn)
  check_equal(fns)
  times = interleaved_times(fns, rounds, reps, warmup=2)
  n = sum(x.size for x in jax.tree.leaves(params))
  return {'size': label, 'dims': dims, 'num_params': int(n), 'rounds': rounds, 'reps': reps,
          'rounds_ms': {k: [t * 1e3 for t in v] for k, v in times.items()}}


def report(results, seconds, quick) -> str:
  from experiments.timing import paired as _paired
  core, core1 = 'accumjax core (masks each micro-batch)', 'accumjax core (one check per update)'
  lines = ['# The accumulation core vs the code it replaces (side by side, one process)', '',
           f'Command: `python -m experiments.bench --core{" --quick" if quick else ""}` '
           f'({seconds / 60:.1f} min, {os.cpu_count()} CPU cores, JAX on CPU, float32). One '
           f'gradient of (sum of weighted per-row losses) / (total weight) over K = {K} '
           'micro-batches: a tanh MLP on rows with uneven per-row weights (0 to 3), every '
           'variant jitted once and checked equal to the full batch first, then timed in '
           'interleaved rounds (each variant once per round, in turn); a ratio is the median '
           'over rounds of two variants\' times in the same round (with the 25th-75th '
           'percentiles of those ratios where given). Variants: accumjax `accumulate_gradients` '
           'as the `skip_microbatch`/`raise` policies run it (each micro-batch\'s gradient '
           'checked and masked) and as the default `skip_update` runs it '
           '(`mask_microbatches=False`: loss and weight checked per micro-batch, the gradient '
           'sum once); a hand-written `lax.scan` adding each micro-batch\'s gradient of its '
           'loss sum into a carry, divided once (MaxText\'s shape); '
           '`optax.microbatching.micro_grad` of the loss sum; the full batch (`jax.grad` of the '
           'weighted mean).', '',
           '| size | params | rows | rounds x calls | full batch ms | accumjax (masks) / '
           'hand-written scan | accumjax (one check) / hand-written scan | accumjax (one check) '
           '/ optax.microbatching | accumjax (one check) / full batch | hand-written scan / '
           'full batch |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    full = statistics.median(r['rounds_ms']['full batch'])
    lines.append(
        f'| {r["size"]} ({r["dims"]["layers"]} x {r["dims"]["width"]}) | {r["num_params"]:,} '
        f'| {r["dims"]["rows"]} | {r["rounds"]} x {r["reps"]} | {full:.1f} | '
        f'{_paired(r, core, "hand-written scan", quartiles=True)} | '
        f'{_paired(r, core1, "hand-written scan", quartiles=True)} | '
        f'{_paired(r, core1, "optax.microbatching")} | {_paired(r, core1, "full batch")} | '
        f'{_paired(r, "hand-written scan", "full batch")} |')
  lines += ['', 'Milliseconds per gradient (median over rounds):', '',
            '| size | ' + ' | '.join(results[0]['rounds_ms']) + ' |',
            '|---|' + '---|' * len(results[0]['rounds_ms'])]
  for r in results:
    lines.append(f'| {r["size"]} | ' + ' | '.join(
        f'{statistics.median(v):.1f}' for v in r['rounds_ms'].values()) + ' |')
  return '\n'.join(lines) + '\n'


def main(quick: bool, out) -> str:
  start = time.time()
  sizes = QUICK if quick else SIZES
  results = [measure(label, dims, rounds=3 if quick else 9, reps=1 if quick else 2)
             for label, dims in sizes.items()]
  text = report(results, time.time() - start, quick)
  out.write_text(text)
  return text
