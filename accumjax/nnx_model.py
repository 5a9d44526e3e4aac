"""A flax.nnx module as the pure functions the train step takes: `NnxModel`.

The train step is a pure function of plain trees (`loss_fn(params, batch, rng[,
model_state])`, see `accumjax.step`), jitted and scanned over micro-batches. An `nnx.Module` is
a mutable Python object; `NnxModel(module)` splits it once into its parameters and its model
state (BatchNorm's running averages: `nnx.BatchStat` by default) as plain dicts of arrays, and
`apply` runs the module on them inside the trace, returning the outputs and the new model
state:

    model = NnxModel(cnn)                      # cnn: your nnx.Module, e.g. with nnx.BatchNorm
    def loss_fn(params, batch, rng, model_state):
      logits, model_state = model.apply(params, model_state, batch['x'])
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])
      return (jnp.sum(nll * batch['w']), jnp.sum(batch['w'])), model_state
    state = accumjax.init_train_state(model.params, opt, 0, config,
                                      model_state=model.model_state, state_rules='mean')
    step = accumjax.make_train_step(loss_fn, opt, config, state_rules='mean')

`apply` builds a fresh module from the trees on every call (it never mutates variables made
outside the trace, the `Cannot mutate BatchStat from a different trace level` trap of merging
a split module by hand), in train mode by default (BatchNorm normalises with the micro-batch's
statistics and updates its averages); `apply(..., train=False)` and `module(...)` use eval
mode (the running averages). A module without model state gives `model_state=None`: then the
loss_fn takes three arguments and `apply(params, None, ...)` returns None as the new state.
`NnxModel.loss_fn(loss_of)` writes the loss_fn above for you. What `state_rules` to choose for
BatchNorm, and what accumulation does to BatchNorm's gradient: docs/studies.md.
"""

from collections.abc import Callable

import jax

from accumjax.errors import ConfigError


def _nnx():
  from flax import nnx  # flax is a dependency; imported here so `import accumjax` stays light
  return nnx


class NnxModel:
  """An `nnx.Module` split into plain trees: `params`, `model_state`; `apply` runs it on them.

  Args:
    module: the flax.nnx module (not changed: a copy is split).
    model_state: the nnx filter of the variables that the forward pass updates and the train
      step carries as model state (default `nnx.BatchStat`). Variables that are neither
      `nnx.Param` nor this (e.g. RNG state) are kept as they are.
  """

  def __init__(self, module, model_state=None):
    nnx = _nnx()
    if not isinstance(module, nnx.Module):
      raise ConfigError(f'module={type(module).__name__}: NnxModel takes a flax.nnx Module.')
    state_filter = nnx.BatchStat if model_state is None else model_state
    copy = nnx.clone(module)
    copy.train()
    self._train_def, params, stats, self._rest = nnx.split(copy, nnx.Param, state_filter, ...)
    copy.eval()
    self._eval_def = nnx.split(copy, nnx.Param, state_filter, ...)[0]
    self._state_filter = state_filter
    self._templates = (params, stats)
    self.params = nnx.to_pure_dict(params)
    stats = nnx.to_pure_dict(stats)
    self.model_state = stats if jax.tree.leaves(stats) else None

  def module(self, params, model_state=None, train: bool = False):
    """A fresh nnx.Module holding these trees (eval mode unless `train`): for evaluation,
    inspection or saving outside the train step."""
    nnx = _nnx()
    p, s = (nnx.clone(t) for t in self._templates)
    nnx.replace_by_pure_dict(p, params)
    if model_state is not None:
      nnx.replace_by_pure_dict(s, model_state)
    elif self.model_state is not None:
      raise ConfigError('model_state=None, but the module has model state (NnxModel.model_state): '
                        'pass the state the train step carries (TrainState.model_state).')
    return nnx.merge(self._train_def if train else self._eval_def, p, s, nnx.clone(self._rest))

  def apply(self, params, model_state, *args, train: bool = True, **kwargs):
    """`(outputs, new_model_state)` of `module(*args, **kwargs)` on these trees: pure, for use
    inside `jax.jit`, `lax.scan` and `jax.grad` (a fresh module per call)."""
    nnx = _nnx()
    module = self.module(params, model_state, train=train)
    out = module(*args, **kwargs)
    if self.model_state is None:
      return out, None
    return out, nnx.to_pure_dict(nnx.state(module, self._state_filter))

  def loss_fn(self, loss_of: Callable, inputs: str | Callable = 'x') -> Callable:
    """A loss_fn for the train step: the module's outputs on `batch[inputs]` (or on
    `*inputs(batch)`), then `loss_of(outputs, batch) -> (loss_sum, weight[, aux])`. With model
    state it takes and returns it (`loss_fn(params, batch, rng, model_state) -> ((loss_sum,
    weight), new_state)`); the rng is not used (pass RNG streams yourself with `apply`)."""
    args_of = inputs if callable(inputs) else (lambda batch: (batch[inputs],))

    if self.model_state is None:
      def loss_fn(params, batch, rng):
        del rng
        return loss_of(self.apply(params, None, *args_of(batch))[0], batch)
      return loss_fn

    def loss_fn_with_state(params, batch, rng, model_state):
      del rng
      out, new_state = self.apply(params, model_state, *args_of(batch))
      return loss_of(out, batch), new_state
    return loss_fn_with_state
