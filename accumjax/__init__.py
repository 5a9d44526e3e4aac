"""accumjax: gradient accumulation that is provably the same math as one big batch."""

from accumjax.config import AccumConfig, describe
from accumjax.core import (
    ConfigError,
    GradSums,
    accumulate_gradients,
    accumulate_sums,
    normalize,
    split_microbatches,
)
from accumjax.losses import per_example_loss, token_cross_entropy
from accumjax.optim import accumulating_optimizer, as_opt_params, normalized
from accumjax.precision import cast_floats, with_compute_dtype
from accumjax.step import TrainState, init_train_state, make_flush, make_train_step

__all__ = [
    'AccumConfig', 'ConfigError', 'GradSums', 'TrainState', 'accumulate_gradients',
    'accumulate_sums', 'accumulating_optimizer', 'as_opt_params', 'cast_floats', 'describe',
    'init_train_state', 'make_flush', 'make_train_step', 'normalize', 'normalized',
    'per_example_loss', 'split_microbatches', 'token_cross_entropy', 'with_compute_dtype',
]
