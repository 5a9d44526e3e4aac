"""BatchNorm under accumulation, on scikit-learn's digits with flax.nnx (BatchNorm, GroupNorm,
LayerNorm): the ghost-batch-norm gradient error, the running averages under each
`accumjax.model_state` rule, and training runs. `python -m experiments.batchnorm` runs it and
says what to expect; docs/studies.md has the findings.
"""


import numpy as np

from accumjax.studies import lm_task

BATCH = 64
SETTINGS = {
    'full': dict(ks=(2, 4, 8, 16), grad_batches=6, train_k=8, epochs=12, seeds=3),
    'quick': dict(ks=(2, 8), grad_batches=2, train_k=8, epochs=2, seeds=1),
}
NORMS = ('batch', 'group', 'layer')
RUNS = (('batch', 1, 'mean'), ('batch', 8, 'mean'), ('batch', 8, 'last'), ('group', 1, None),
        ('group', 8, None))


def load_digits(seed=0):
  """(train x, train y, test x, test y): 8x8x1 images in [0, 1], a fixed 80/20 split."""
  try:
    from sklearn.datasets import load_digits as sk_digits
  except ImportError as e:  # pragma: no cover (a dependency of accumjax)
    raise SystemExit('experiments.batchnorm needs scikit-learn (pip install scikit-learn): '
                     f'{e}') from None
  d = sk_digits()
  x = (d.data.reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  cut = int(0.8 * len(x))
  return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def make_model(norm: str, seed: int = 0):
  from flax import nnx

  def norm_layer(features, rngs):
    if norm == 'batch':
      return nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
    if norm == 'group':
      return nnx.GroupNorm(features, num_groups=4, rngs=rngs)
    return nnx.LayerNorm(features, rngs=rngs)

  class CNN(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
      self.norm1 = norm_layer(16, rngs)
      self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
      self.norm2 = norm_layer(32, rngs)
      self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x, upto=None):
      """Logits; `upto='norm1'`/`'norm2'` stops at that layer's input."""
      h = self.conv1(x)
      if upto == 'norm1':
        return h
      h = self.conv2(nnx.relu(self.norm1(h)))
      if upto == 'norm2':
        return h
      return self.head(nnx.relu(self.norm2(h)).mean(axis=(1, 2)))

  return CNN(nnx.Rngs(seed))


class Net:
  """The model as pure functions of (params, stats) dicts, for accumjax's loss_fn."""

  def __init__(self, norm, seed=0):
    from flax import nnx
    model = make_model(norm, seed)
    model.train()
    self.train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.eval()
    self.eval_def = nnx.split(model, nnx.Param, nnx.BatchStat)[0]
    self.params, self.stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    self._params_t, self._stats_t = params, stats
    self.norm = norm

  def module(self, params, stats, train=True):
    from flax import nnx
    p, s = nnx.clone(self._params_t), nnx.clone(self._stats_t)
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(s, stats)
    return nnx.merge(self.train_def if train else self.eval_def, p, s)

  def loss(self, params, batch, rng, stats=None):
    """(loss_sum, examples) over the batch's real rows; with BatchNorm also the new stats."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    del rng
    model = self.module(params, {} if stats is None else stats)
    logits = model(batch['x'])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch['y'][:, None], 1)[:, 0]
    out = (jnp.sum(nll), jnp.asarray(batch['y'].shape[0], jnp.float32))
    if stats is None:
      return out
    return out, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  def logits(self, params, stats, x, train=False):
    return self.module(params, stats, train)(x)


def big_grad(net, params, stats, batch, stop_stats=False):
  """The big batch's gradient of the mean loss (BatchNorm over all rows); `stop_stats`: with
  no gradient through the batch statistics (the forward pass in eval mode, with the running
  averages set to the big batch's statistics, layer by layer)."""
  import jax
  if stop_stats:
    return accumulated_stats_grad(net, params, stats, batch, 1)
  if net.norm != 'batch':
    return jax.grad(lambda p: net.loss(p, batch, None)[0] / batch['y'].shape[0])(params)
  return jax.grad(lambda p: net.loss(p, batch, None, stats)[0][0] / batch['y'].shape[0])(params)


def ghost_grad(net, params, stats, batch, k):
  import accumjax
  if net.norm != 'batch':
    g, _ = accumjax.accumulate_gradients(net.loss, params, batch, num_microbatches=k)
    return g
  g, _ = accumjax.accumulate_gradients(net.loss, params, batch, num_microbatches=k,
                                       model_state=stats, state_rules='mean')
  return g


def accumulated_stats_grad(net, params, stats, batch, k):
  """Micro-batches normalized with the big batch's statistics, found in one pass per BatchNorm
  layer (its input's first and second moments summed over the K micro-batches, with the
  earlier layers already using theirs); then the usual accumulation in eval mode."""
  import jax
  import jax.numpy as jnp

  import accumjax
  mbs = accumjax.split_microbatches(batch, k)
  fixed = jax.tree.map(lambda x: x, stats)
  for layer in ('norm1', 'norm2'):
    model = net.module(params, fixed, train=False)
    def moments(mb, model=model, layer=layer):
      h = model(mb['x'], upto=layer)
      return h.sum((0, 1, 2)), (h * h).sum((0, 1, 2)), jnp.float32(h.size // h.shape[-1])

    first, second, n = jax.lax.map(moments, mbs)
    mean = first.sum(0) / n.sum()
    fixed[layer] = {'mean': mean, 'var': second.sum(0) / n.sum() - mean ** 2}

  def loss(p, mb, rng):
    logits = net.logits(p, fixed, mb['x'], train=False)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), mb['y'][:, None], 1)[:, 0]
    return jnp.sum(nll), jnp.asarray(mb['y'].shape[0], jnp.float32)

  g, _ = accumjax.accumulate_gradients(loss, params, batch, num_microbatches=k)
  return g


def rel_error(a, b) -> float:
  import jax
  import jax.numpy as jnp
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                          strict=True))
  den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
  return (num / den) ** 0.5


def batches(x, y, rng):
  order = rng.permutation(len(x))
  for i in range(len(x) // BATCH):
    idx = order[i * BATCH:(i + 1) * BATCH]
    yield {'x': x[idx], 'y': y[idx]}


def gradient_errors(data, s, trained) -> list[dict]:
  """Mean relative gradient error over s['grad_batches'] batches, at init and at `trained`
  params (BatchNorm net after training), per method and K."""
  rows = []
  x, y = data[0], data[1]
  nets = {norm: Net(norm) for norm in NORMS}
  points = {'init': {n: (nets[n].params, nets[n].stats) for n in NORMS},
            'trained': {'batch': trained}}
  for when, at in points.items():
    for k in s['ks']:
      errs = {}
      for i, batch in enumerate(batches(x, y, np.random.default_rng(1))):
        if i == s['grad_batches']:
          break
        for norm, (params, stats) in at.items():
          net = nets[norm]
          ref = big_grad(net, params, stats, batch)
          name = {'batch': 'BatchNorm, micro-batch statistics', 'group': 'GroupNorm',
                  'layer': 'LayerNorm'}[norm]
          errs.setdefault(name, []).append(rel_error(ghost_grad(net, params, stats, batch, k),
                                                     ref))
          if norm == 'batch':
            acc = accumulated_stats_grad(net, params, stats, batch, k)
            errs.setdefault('BatchNorm, accumulated statistics', []).append(rel_error(acc, ref))
            errs.setdefault('BatchNorm, accumulated statistics vs big batch with '
                            'stop-gradient statistics', []).append(
                rel_error(acc, big_grad(net, params, stats, batch, stop_stats=True)))
      for name, v in errs.items():
        rows.append(dict(when=when, k=k, method=name, error=float(np.mean(v)),
                         spread=float(np.std(v))))
  return rows


def running_average_errors(data, k) -> dict:
  """After one update from the initial state: the change each rule makes to the running
  averages, against the big batch's change, per BatchNorm layer (relative error)."""
  import jax.numpy as jnp

  import accumjax
  net = Net('batch')
  batch = next(batches(data[0], data[1], np.random.default_rng(2)))
  _, big = net.loss(net.params, batch, None, net.stats)
  out = {}
  for rule in ('mean', 'last'):
    _, m = accumjax.accumulate_gradients(net.loss, net.params, batch, num_microbatches=k,
                                         model_state=net.stats, state_rules=rule)
    for layer in ('norm1', 'norm2'):
      for leaf in ('mean', 'var'):
        start = net.stats[layer][leaf]
        got, want = m['model_state'][layer][leaf] - start, big[layer][leaf] - start
        out[(rule, layer, leaf)] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  return out


def train(data, norm, k, rule, seed, epochs):
  """One run: Adam 3e-3, batch 64 as K micro-batches, scan mode. Returns (train losses per
  update, test accuracy, final (params, stats))."""
  import jax
  import jax.numpy as jnp
  import optax

  import accumjax
  net = Net(norm, seed)
  config = accumjax.AccumConfig(num_microbatches=k, microbatch_size=BATCH // k)
  tx = accumjax.accumulating_optimizer(optax.adam(3e-3), config)
  with_stats = norm == 'batch'
  state = accumjax.init_train_state(
      net.params, tx, seed, config, model_state=net.stats if with_stats else None,
      state_rules=rule if with_stats else None)
  step = accumjax.jit_train_step(accumjax.make_train_step(
      net.loss, tx, config, state_rules=rule if with_stats else None))
  losses = []
  rng = np.random.default_rng(100 + seed)
  for _ in range(epochs):
    for batch in batches(data[0], data[1], rng):
      state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
      losses.append(float(metrics['loss']))
  stats = state.model_state if with_stats else {}
  predict = jax.jit(lambda p, s, x: net.logits(p, s, x, train=False))
  accuracy = float(np.mean(np.argmax(predict(state.params, stats, data[2]), -1) == data[3]))
  return losses, accuracy, (state.params, stats)


def run_name(norm, k, rule):
  name = {'batch': 'BatchNorm', 'group': 'GroupNorm'}[norm]
  if k == 1:
    return f'{name}, big batch'
  return f'{name}, K={k}' + (f", rule '{rule}'" if rule else '')


def _smooth(x, n=20):
  x = np.asarray(x)
  return np.convolve(x, np.ones(n) / n, mode='valid') if len(x) > n else x


def report(s, result, seconds, quick) -> str:
  lines = [
      '# BatchNorm under gradient accumulation', '',
      f'Command: `python -m experiments.batchnorm{" --quick" if quick else ""}` '
      f'({seconds / 60:.1f} min on 2 CPU cores). scikit-learn digits (1,437 train / 360 test '
      f'images, 8x8), a small flax.nnx CNN, batch {BATCH}, Adam 3e-3.', '',
      '## Gradient error against the big batch (same params)', '',
      f'Relative error ||g - g_big|| / ||g_big||, mean (and spread) over {s["grad_batches"]} '
      'batches. GroupNorm and LayerNorm are compared with their own big batch; the BatchNorm '
      'rows with the big batch normalized by all 64 images. "trained": the params of the '
      'BatchNorm big-batch run after training.', '',
      '| params | method | ' + ' | '.join(f'K={k}' for k in s['ks']) + ' |',
      '|---|---|' + '---|' * len(s['ks'])]
  errors = result['errors']
  for when in dict.fromkeys(e['when'] for e in errors):
    for method in dict.fromkeys(e['method'] for e in errors if e['when'] == when):
      cells = [next(f'{e["error"]:.2e} (±{e["spread"]:.1e})' for e in errors
                    if e['when'] == when and e['method'] == method and e['k'] == k)
               for k in s['ks']]
      lines.append(f'| {when} | {method} | ' + ' | '.join(cells) + ' |')
  av = result['averages']
  lines += ['', f'## Running averages after one update (K = {s["train_k"]})', '',
            'The change one update makes to the BatchNorm running averages (momentum 0.9, '
            'from the initial state), relative error against the big batch\'s change.', '',
            '| rule | norm1 mean | norm1 var | norm2 mean | norm2 var |', '|---|---|---|---|---|']
  for rule in ('mean', 'last'):
    lines.append(f"| '{rule}' | " + ' | '.join(
        f'{av[(rule, layer, leaf)]:.2e}' for layer in ('norm1', 'norm2')
        for leaf in ('mean', 'var')) + ' |')
  lines += ['', f'## Training ({s["epochs"]} epochs, {s["seeds"]} seed(s))', '',
            '| run | final train loss (mean of last 20 updates) | test accuracy |',
            '|---|---|---|']
  for name, rs in result['runs'].items():
    final = [float(np.mean(losses[-20:])) for losses, _ in rs]
    acc = [a for _, a in rs]
    lines.append(f'| {name} | {np.mean(final):.4f} ± {np.std(final):.4f} | '
                 f'{np.mean(acc):.4f} ± {np.std(acc):.4f} |')
  return '\n'.join(lines) + '\n'


def plot(result, s, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  for name, rs in result['runs'].items():
    curve = np.mean([_smooth(losses) for losses, _ in rs], axis=0)
    axes[0].plot(curve, label=name, lw=1.2)
  axes[0].set_xlabel('update')
  axes[0].set_ylabel('train loss (20-update mean)')
  axes[0].set_yscale('log')
  axes[0].legend(fontsize=7)
  for (when, method) in dict.fromkeys((e['when'], e['method']) for e in result['errors']):
    pts = [e for e in result['errors'] if e['when'] == when and e['method'] == method]
    axes[1].plot([e['k'] for e in pts], [max(e['error'], 1e-9) for e in pts],
                 'o-' if when == 'init' else 's--', label=f'{method} ({when})')
  axes[1].set_xscale('log', base=2)
  axes[1].set_yscale('log')
  axes[1].set_xlabel('K (micro-batches of 64 / K images)')
  axes[1].set_ylabel('||g - g_big|| / ||g_big||')
  axes[1].legend(fontsize=6)
  lm_task.save_figure(fig, axes, path)
