import jax, jax.numpy as jnp
from experiments import scale
from accumjax import state as state_lib, layers, parallel
import accumjax, optax
for size in ('85M',):
  for remat in ('none', 'dots', 'full'):
    dims = scale.SIZES[size]
    mesh = parallel.make_mesh(1, 8)
    loss_fn, params = scale._model(size, remat)
    config = accumjax.AccumConfig(num_microbatches=8, microbatch_size=dims['b'], compute_dtype='float32', seq_len=dims['seq'], num_devices=8, fsdp_gather='layer')
    tx = accumjax.accumulating_optimizer(scale._optimizer(), config)
    state = parallel.abstract_state(jax.eval_shape(lambda p: accumjax.init_train_state(p, tx, 0, config), params), mesh)
    batch = scale._batch(8 * dims['b'] * 8, dims['seq'], parallel.batch_sharding(mesh))
    step = accumjax.jit_train_step(accumjax.make_train_step(loss_fn, tx, config, mesh=mesh))
    m = step.lower(state, batch, last_call=True).compile().memory_analysis()
    act = layers.saved_activation_bytes(loss_fn, params, scale._batch(dims['b'], dims['seq'], None), jnp.float32)
    actn = layers.saved_activation_bytes(scale._model(size, 'none')[0], params, scale._batch(dims['b'], dims['seq'], None), jnp.float32)
    parts = state_lib.live_bytes_per_device(state, config, 8, stacked=params['blocks'], activation_bytes=act)
    tot = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    print(size, remat, 'fp32 XLA total', tot/1e9, 'est', parts['total']/1e9, 'act', act/1e9, 'per-layer none', actn/12/1e9)
