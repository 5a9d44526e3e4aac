"""A decoder-only transformer language model in flax.nnx, used functionally.

Pre-LN blocks, causal multi-head attention, learned or rotary positions, optional dropout.
The blocks are stacked on a leading layer axis (`params['blocks']`, built with `nnx.vmap`) and
run under one `lax.scan` (`accumjax.layers.scan_layers`): one layer is compiled whatever the
depth, an FSDP mesh gathers one layer at a time, and `remat` chooses what each block keeps for
the backward pass. `make_lm` builds the module once, splits it (`nnx.split`) and returns a pure
`apply(params, tokens, rng) -> logits` over a plain dict of float32 params, to be used inside
`jax.jit` and `lax.scan` (a plain `jax.jit` over nnx objects would drop in-place updates).
Dropout takes an explicit key, so each micro-batch's mask comes from the accumulation core.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from accumjax.layers import REMATS, check_remat, saved_activation_bytes, scan_layers
from accumjax.losses import token_cross_entropy
from accumjax.planner import transformer_flops_per_token
from accumjax.settings import finite_number, setting
from accumjax.state import live_bytes_per_device

POSITIONS = ('rope', 'learned')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The transformer's shape: one declared setting per field (see accumjax/settings.py)."""
  vocab_size: int = 258
  d_model: int = setting(128, 'width of the residual stream', group='model', minimum=1)
  num_layers: int = setting(4, 'transformer blocks', group='model', flag='--layers', minimum=1)
  num_heads: int = setting(4, 'attention heads', group='model', flag='--heads', minimum=1)
  mlp_ratio: int = setting(4, 'MLP width / d_model', group='model', minimum=1)
  max_len: int = setting(256, 'longest sequence allowed', group='model', minimum=1)
  positions: str = setting('rope', 'rotary (rope) or learned position embeddings',
                           group='model', choices=POSITIONS)
  dropout: float = setting(0.0, 'dropout rate', group='model',
                           check=(finite_number(lambda v: 0.0 <= v < 1.0), 'must be in [0, 1).'))
  remat: str = setting(
      'none', 'what each block keeps for the backward pass: none (everything), dots (matmul '
      'outputs), full (nothing: recomputed, ~1/3 more FLOPs). Same numbers, less memory',
      group='model', choices=REMATS, on_resume='harmless')


def _dropout(x, rate, rng):
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _rope(x_BxTxHxD):
  t, d = x_BxTxHxD.shape[1], x_BxTxHxD.shape[-1]
  freqs = 1.0 / (10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles_TxD2 = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]
  sin = jnp.sin(angles_TxD2)[None, :, None, :].astype(x_BxTxHxD.dtype)
  cos = jnp.cos(angles_TxD2)[None, :, None, :].astype(x_BxTxHxD.dtype)
  x1, x2 = x_BxTxHxD[..., 0::2], x_BxTxHxD[..., 1::2]
  return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x_BxTxHxD.shape)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d = cfg.d_model
    self.cfg = cfg
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.proj = nnx.Linear(d, d, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

  def __call__(self, x_BxTxD, rng):
    cfg = self.cfg
    b, t, d = x_BxTxD.shape
    h, hd = cfg.num_heads, d // cfg.num_heads
    rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
    qkv = self.qkv(self.ln1(x_BxTxD)).reshape(b, t, 3, h, hd)
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cfg.positions == 'rope':
      q_BxTxHxK, k_BxTxHxK = _rope(q_BxTxHxK), _rope(k_BxTxHxK)
    scores_BxHxTxT = jnp.einsum('bqhk,bthk->bhqt', q_BxTxHxK, k_BxTxHxK) / jnp.sqrt(hd).astype(
        x_BxTxD.dtype)
    causal_TxT = jnp.tril(jnp.ones((t, t), bool))
    scores_BxHxTxT = jnp.where(causal_TxT, scores_BxHxTxT, jnp.finfo(scores_BxHxTxT.dtype).min)
    probs = jax.nn.softmax(scores_BxHxTxT.astype(jnp.float32), axis=-1).astype(x_BxTxD.dtype)
    probs = _dropout(probs, cfg.dropout, rngs[0])
    attn_BxTxD = jnp.einsum('bhqt,bthk->bqhk', probs, v_BxTxHxK).reshape(b, t, d)
    x_BxTxD = x_BxTxD + _dropout(self.proj(attn_BxTxD), cfg.dropout, rngs[1])
    mlp = self.fc2(jax.nn.gelu(self.fc1(self.ln2(x_BxTxD))))
    return x_BxTxD + _dropout(mlp, cfg.dropout, rngs[2])


class TransformerLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    if cfg.positions == 'learned':
      self.pos = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = stacked_blocks(rngs)
    self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens_BxT, rng=None):
    # Direct lookups: nnx.Embed fixes its compute dtype at construction, and the compute
    # dtype here must follow the params (cast by accumjax.precision).
    x_BxTxD = jnp.take(self.embed.embedding[...], tokens_BxT, axis=0)
    if self.cfg.positions == 'learned':
      x_BxTxD = x_BxTxD + self.pos.embedding[...][None, :tokens_BxT.shape[1]]
    graphdef, blocks = nnx.split(self.blocks)
    block = lambda params, x, key=None: nnx.merge(graphdef, params)(x, key)
    keys = None if rng is None else jax.random.split(rng, self.cfg.num_layers)
    x_BxTxD = scan_layers(block, x_BxTxD, blocks, keys, remat=self.cfg.remat)
    return self.head(self.ln_f(x_BxTxD))


def make_lm(cfg: ModelConfig, seed: int = 0, abstract: bool = False):
  """(apply, params): `apply(params, tokens_BxT, rng=None) -> logits_BxTxV`; params a dict.

  The compute dtype follows the params' dtype (see accumjax.precision). `abstract`: params as
  `jax.ShapeDtypeStruct`s, nothing allocated (to compile a model too big for this machine).
  """
  if cfg.positions not in POSITIONS:
    raise ValueError(f'positions={cfg.positions!r}; allowed: {", ".join(POSITIONS)}.')
  if cfg.d_model % cfg.num_heads or (cfg.d_model // cfg.num_heads) % 2:
    raise ValueError(
        f'd_model={cfg.d_model} must split into num_heads={cfg.num_heads} heads of even size.')
  check_remat(cfg.remat)
  build = lambda: TransformerLM(cfg, nnx.Rngs(seed))
  model = nnx.eval_shape(build) if abstract else build()
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)

  def apply(params, tokens_BxT, rng=None):
    if tokens_BxT.shape[1] > cfg.max_len:
      raise ValueError(f'sequence length {tokens_BxT.shape[1]} > max_len={cfg.max_len}.')
    return nnx.merge(graphdef, params)(tokens_BxT, rng)

  return apply, params


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def activation_estimate(cfg: ModelConfig, microbatch_size: int, seq_len: int,
                        compute_dtype) -> tuple[int, int]:
  """(bytes the backward pass keeps of one device's micro-batch under cfg.remat, one layer's
  intermediates without remat), from `layers.saved_activation_bytes`: traced, nothing runs.

  On a CPU backend XLA computes bfloat16 in float32 and keeps float32 copies of the stacked
  intermediates (its buffer assignment shows them), so there they are counted as float32."""
  if jax.default_backend() == 'cpu':
    compute_dtype = jnp.float32
  tokens = jax.ShapeDtypeStruct((microbatch_size, seq_len), jnp.int32)
  batch = {'inputs': tokens, 'targets': tokens,
           'mask': jax.ShapeDtypeStruct((microbatch_size, seq_len), jnp.float32)}

  def saved(remat):
    apply, params = make_lm(dataclasses.replace(cfg, remat=remat), abstract=True)
    loss = lambda p, mb, rng: token_cross_entropy(apply(p, mb['inputs'], rng), mb['targets'],
                                                  mb['mask'])
    return saved_activation_bytes(loss, params, batch, compute_dtype)

  without_remat = saved('none')
  return (without_remat if cfg.remat == 'none' else saved(cfg.remat),
          without_remat // cfg.num_layers)


def live_set(cfg: ModelConfig, state, config, fsdp: int = 1) -> dict:
  """`state.live_bytes_per_device` of this LM's (placed or abstract) train state under the
  `AccumConfig` `config` (its micro-batch, seq_len and compute dtype) on a mesh of `fsdp`, with
  the activation estimate of one device's micro-batch."""
  saved, layer = activation_estimate(cfg, config.microbatch_size, config.seq_len,
                                     config.compute_jnp_dtype)
  return live_bytes_per_device(state, config, fsdp, stacked=state.params['blocks'],
                               activation_bytes=saved, layer_bytes=layer)


def flops_per_token(cfg: ModelConfig, params, seq_len: int, remat: str = 'none') -> float:
  """Training FLOPs per token of this LM (`planner.transformer_flops_per_token` of its params
  without the token embedding, the head and learned positions)."""
  embedding = cfg.vocab_size * cfg.d_model * 2
  if cfg.positions == 'learned':
    embedding += cfg.max_len * cfg.d_model
  return transformer_flops_per_token(num_params(params) - embedding, cfg.num_layers,
                                     cfg.d_model, seq_len, remat)
