"""An independent plain full-batch reference, and the tiny model the equivalence tests use.

Nothing here imports accumjax: the reference computes the token-weighted mean loss of the
*whole* batch in one `jax.grad` and steps a plain optax optimizer, the way one would without
accumulation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

VOCAB, DIM, HIDDEN, SEQ = 32, 16, 24, 12


def init_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {
      'embed': jax.random.normal(k[0], (VOCAB, DIM)) * 0.5,
      'prev': jax.random.normal(k[1], (VOCAB, DIM)) * 0.5,
      'w1': jax.random.normal(k[2], (DIM, HIDDEN)) / np.sqrt(DIM),
      'b1': jnp.zeros((HIDDEN,)),
      'out': jax.random.normal(k[3], (HIDDEN, VOCAB)) / np.sqrt(HIDDEN),
  }


def logits_fn(params, inputs_BxT, dropout_rng=None, rate=0.0):
  """A two-token-context MLP language model: enough to give every parameter a gradient."""
  prev_BxT = jnp.pad(inputs_BxT, ((0, 0), (1, 0)))[:, :-1]
  h_BxTxD = params['embed'][inputs_BxT] + params['prev'][prev_BxT]
  h_BxTxH = jnp.tanh(h_BxTxD @ params['w1'] + params['b1'])
  if dropout_rng is not None and rate > 0:
    keep = jax.random.bernoulli(dropout_rng, 1 - rate, h_BxTxH.shape)
    h_BxTxH = jnp.where(keep, h_BxTxH / (1 - rate), 0)
  return h_BxTxH @ params['out']


def make_batches(num_updates, rows, seed=0, sort_lengths=True):
  """Padded variable-length sequences; sorted so micro-batches carry very different counts."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(num_updates):
    tokens = rng.integers(1, VOCAB, size=(rows, SEQ + 1))
    lengths = rng.integers(1, SEQ + 1, size=rows)
    if sort_lengths:
      lengths = np.sort(lengths)[::-1]
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.float32)
    batches.append({
        'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
        'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
        'mask': jnp.asarray(mask),
    })
  return batches


def full_batch_loss(params, batch):
  logits = logits_fn(params, batch['inputs'])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], axis=-1)[..., 0]
  return jnp.sum(nll * batch['mask']) / jnp.sum(batch['mask'])


def run_reference(params, batches, opt: optax.GradientTransformation):
  """Plain full-batch training: returns final params and the loss of each update."""
  state = opt.init(params)
  losses = []
  for batch in batches:
    loss, grads = jax.value_and_grad(full_batch_loss)(params, batch)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  return params, np.array(losses)


def rel_err(a, b):
  """Largest per-leaf relative error ||a - b|| / ||b||."""
  errs = jax.tree.map(
      lambda x, y: float(jnp.linalg.norm((x - y).ravel()) / jnp.linalg.norm(y.ravel())), a, b)
  return max(jax.tree.leaves(errs))


def noise_reference(params, batch, num_chunks):
  """The gradient noise statistics of one batch cut into `num_chunks` consecutive row chunks
  (the micro-batches, over all devices), from each chunk's own token-weighted gradient, in
  float64 NumPy: A = sum_j w_j |m_j|^2, B = W |M|^2, tr = (A - B) / (n - 1),
  |G|^2 = |M|^2 - tr / W, over the chunks with tokens."""
  rows = batch['mask'].shape[0] // num_chunks
  means, weights = [], []
  for j in range(num_chunks):
    chunk = jax.tree.map(lambda x, j=j: x[j * rows:(j + 1) * rows], batch)
    w = float(np.sum(chunk['mask']))
    if w == 0:
      continue
    g = jax.grad(full_batch_loss)(params, chunk)
    means.append(np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)]))
    weights.append(w)
  m, w = np.stack(means), np.array(weights)
  big_mean = (w[:, None] * m).sum(0) / w.sum()
  a = float(np.sum(w * np.sum(m * m, axis=1)))
  b = float(w.sum() * big_mean @ big_mean)
  trace = (a - b) / (len(w) - 1)
  g_sq = float(big_mean @ big_mean) - trace / w.sum()
  return {'g_sq': g_sq, 'trace_sigma': trace, 'b_simple': trace / g_sq}
