"""accumjax: gradient accumulation that is provably the same math as one big batch.

The accumulation library: importable from a notebook, no flags, no printing. The LM trainer
built on it lives in `accumjax.lm`.
"""

from accumjax import (
    checkpoint,
    layers,
    loop,
    model_state,
    nnx_model,
    noise,
    parallel,
    planner,
    schedules,
    state,
)
from accumjax.config import AccumConfig
from accumjax.core import (
    ConfigError,
    GradSums,
    NoiseSums,
    accumulate_gradients,
    accumulate_sums,
    noise_scale,
    normalize,
    split_microbatches,
)
from accumjax.layers import scan_layers
from accumjax.loop import Updates, pad_rows, run_update
from accumjax.losses import per_example_loss, token_cross_entropy
from accumjax.nnx_model import NnxModel
from accumjax.noise import SmoothedNoiseScale
from accumjax.optim import LazyMultiSteps, accumulating_optimizer, as_opt_params, normalized
from accumjax.precision import cast_floats, with_compute_dtype
from accumjax.state import Cycle, TrainState, describe, init_train_state
from accumjax.step import jit_train_step, make_flush, make_train_step

__all__ = [
    'AccumConfig', 'ConfigError', 'Cycle', 'GradSums', 'LazyMultiSteps', 'NnxModel', 'NoiseSums',
    'SmoothedNoiseScale', 'TrainState', 'Updates', 'accumulate_gradients', 'accumulate_sums',
    'accumulating_optimizer', 'as_opt_params', 'cast_floats', 'checkpoint', 'describe',
    'init_train_state', 'jit_train_step', 'layers', 'loop', 'make_flush', 'make_train_step',
    'model_state', 'nnx_model', 'noise', 'noise_scale', 'normalize', 'normalized', 'pad_rows',
    'parallel', 'per_example_loss', 'planner', 'run_update', 'scan_layers', 'schedules',
    'split_microbatches', 'state', 'token_cross_entropy', 'with_compute_dtype',
]
