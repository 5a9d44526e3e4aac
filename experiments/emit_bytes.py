"""Where the emitting step's extra memory traffic comes from (issue 31): XLA's cost analysis of
the program that completes an update, part by part, against a plain optax AdamW step.

    python -m experiments.emit_bytes     # ~1 minute on 2 CPU cores

Bytes accessed per parameter (`compiled.cost_analysis()['bytes accessed']` / params) of
`step.apply_cycle` in scan mode (the update's sums given as an argument; no gradient computed),
the state donated, on the main job's LM at d256 x 4 layers (3.3M params, 16 leaves), fp32:
accumjax's default config and the config with each part taken away in turn: clipping, the one
non-finite check of the update's sum (`core.count_nonfinite_sum`; off under skip_microbatch),
the `lax.cond` that leaves a skipped update's state untouched (replaced, in this ablation only,
by an unconditional update), against a plain `optax.adamw` update + apply on the mean gradient
(and `optax.chain(clip_by_global_norm, adamw)` for the clipped row). A static count, not a
timing: what each part reads and writes. Writes benchmarks/emit_bytes.md with the command.
"""

import pathlib
from unittest import mock

import jax
import jax.numpy as jnp
import optax

import accumjax
from accumjax import core, optim
from accumjax import step as step_lib
from accumjax.lm import model

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _setup():
  _, params = model.make_lm(model.ModelConfig(max_len=64, d_model=256, num_layers=4,
                                              num_heads=4))
  key = jax.random.key(0)
  sums = accumjax.GradSums(jax.tree.map(lambda p: jax.random.normal(key, p.shape) * 1e-3, params),
                           jnp.float32(100.0), jnp.float32(50.0), jnp.float32(0.0))
  return params, sums


def emitting_bytes(params, sums, inner, **config_kw) -> float:
  config = accumjax.AccumConfig(num_microbatches=1, microbatch_size=1, **config_kw)
  tx = accumjax.accumulating_optimizer(inner, config)
  state = accumjax.init_train_state(params, inner, 0, config)
  cycle = lambda s: step_lib.Cycle(s, jnp.int32(1), jnp.int32(-1), None)
  fn = jax.jit(lambda st, s: step_lib.apply_cycle(tx, config, st, s, cycle(s))[0],
               donate_argnums=0)
  return fn.lower(state, sums).compile().cost_analysis()['bytes accessed'] / model.num_params(
      params)


def plain_bytes(params, sums, inner) -> float:
  mean = jax.tree.map(lambda g: g / sums.weight, sums.grads)
  fn = jax.jit(lambda st, g: (lambda u, s: (s, optax.apply_updates(st[1], u)))(
      *inner.update(g, st[0], st[1])), donate_argnums=0)
  return fn.lower((inner.init(params), params), mean).compile().cost_analysis()[
      'bytes accessed'] / model.num_params(params)


def _unconditional(inner, policy='skip_update'):
  """`optim.normalized` without its `lax.cond` (the update always runs): the ablation only."""
  def update_fn(sums, state, params=None, **_):
    updates, state = inner.update(core.normalize(sums)[0], state,
                                  None if params is None else params.grads)
    return optim._updates(updates, sums, optim.applies(sums, policy)), state
  return optim.Normalized(lambda p: inner.init(p.grads), update_fn)


def main(out=None):
  params, sums = _setup()
  adamw = optax.adamw(1e-3)
  rows = [
      ('accumjax, clip_norm=1.0 (the LM trainer\'s default)',
       emitting_bytes(params, sums, adamw, clip_norm=1.0),
       plain_bytes(params, sums, optax.chain(optax.clip_by_global_norm(1.0), adamw))),
      ('accumjax, no clipping (the library\'s default)', emitting_bytes(params, sums, adamw),
       plain_bytes(params, sums, adamw)),
      ('- the one non-finite check of the sums (skip_microbatch)',
       emitting_bytes(params, sums, adamw, nonfinite='skip_microbatch'),
       plain_bytes(params, sums, adamw)),
  ]
  with mock.patch.object(optim, 'normalized', _unconditional):
    rows.append(('- and the cond (the update always runs: ablation)',
                 emitting_bytes(params, sums, adamw, nonfinite='skip_microbatch'),
                 plain_bytes(params, sums, adamw)))
  lines = ['# Bytes per parameter of the step that completes an update', '',
           '`python -m experiments.emit_bytes` (XLA cost analysis, see the module docstring).', '',
           '| program | accumjax emitting step | plain optax step | ratio |', '|---|---|---|---|']
  lines += [f'| {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |' for name, a, b in rows]
  text = '\n'.join(lines) + '\n'
  pathlib.Path(out or ROOT / 'benchmarks' / 'emit_bytes.md').write_text(text)
  print(text)
  return rows


if __name__ == '__main__':
  main()
