"""The 'layer' FSDP gather and rematerialisation: the same math as one device and the big batch,
the gathers inside the layer loop, and the pieces they are built from.

The multi-device checks run in a subprocess with 4 fake CPU devices (tests/layer_check.py,
~100 s: marked slow, run by CI).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accumjax
from accumjax import layers
from accumjax import state as state_lib
from accumjax.core import ConfigError
from accumjax.lm import model
from accumjax.lm.build import make_loss_fn
from tests import reference
from tests.test_equivalence import TOL
from tests.test_parallel import device_check

LM = model.ModelConfig(d_model=32, num_layers=3, num_heads=2, max_len=16, dropout=0.1)


@pytest.fixture(scope='module')
def layer(tmp_path_factory):
  return device_check('tests.layer_check', tmp_path_factory.mktemp('layer') / 'checkpoints')


@pytest.mark.slow
def test_layer_gather_gives_the_big_batch_updates_on_padded_data(layer):
  ref = layer['reference_model']
  # {scan, multisteps, hybrid} x {fsdp=4, data=2,fsdp=2} x {reference, 1 device}
  assert len(ref['errors']) == 12, ref['errors']
  assert max(ref['errors'].values()) <= TOL, ref['errors']
  # groups whose sums never met over `data` would be this far off: the check can fail
  assert ref['no_data_sum_error'] > 100 * TOL
  assert all(spec != 'P()' for layout in ref['layouts'].values()
             for spec in layout['specs'].values())


@pytest.mark.slow
def test_scanned_lm_under_the_layer_gather_trains_like_one_device(layer):
  lm = layer['lm']
  for name in ('call', 'layer', 'layer_full_remat'):
    assert lm[name]['error_vs_1_device'] <= TOL, (name, lm[name])
    np.testing.assert_allclose(lm[name]['losses'], lm['one_device_losses'], rtol=1e-6)
  # bfloat16 on data=2,fsdp=2 against bfloat16 on one device: rounding apart, the same run
  assert lm['bf16']['error_vs_1_device'] <= 0.05, lm['bf16']
  np.testing.assert_allclose(lm['bf16']['losses'], lm['bf16']['one_device_losses'], rtol=1e-3)


@pytest.mark.slow
def test_layer_gather_gathers_inside_the_layer_loop(layer):
  """'call': one all-gather before the micro-batch loop, nothing inside any loop. 'layer': the
  blocks' params gathered inside the layer loop (depth 2), forward and backward, and each
  layer's gradient reduced there too; only the unstacked leaves outside it."""
  call, per_layer = (layer['lm'][g]['collectives'] for g in ('call', 'layer'))
  assert call['all-gather'] == {'0': 1}, call
  assert all(set(by) == {'0'} for by in call.values()), call
  gathers = per_layer['all-gather']
  leaves_per_block = 12  # 2 LayerNorms x 2 + 4 Linears x (kernel, bias)
  assert gathers['2'] >= leaves_per_block, per_layer
  assert sum(gathers.values()) - gathers['2'] <= 6, per_layer  # embed, ln_f, head: not blocks
  assert per_layer['all-reduce'].get('2', 0) >= 1, per_layer


@pytest.mark.slow
def test_call_checkpoint_resumes_mid_cycle_under_the_layer_gather(layer):
  assert layer['restore']['updates'] == 2
  assert layer['restore']['error_vs_uninterrupted'] <= TOL, layer['restore']


@pytest.mark.slow
def test_nan_on_one_device_drops_its_groups_microbatch(layer):
  nan = layer['nan_in_one_group']
  assert nan['finite'] and nan['nonfinite'] == 1.0, nan
  assert nan['error_vs_remaining'] <= TOL, nan


def _lm_grads(remat, precision=jnp.float32):
  apply, params = model.make_lm(dataclasses.replace(LM, remat=remat), seed=0)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, LM.vocab_size, size=(4, 17)), jnp.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'mask': jnp.ones((4, 16), jnp.float32).at[2:, 10:].set(0.0)}
  loss_fn = accumjax.with_compute_dtype(make_loss_fn(apply), precision)
  grad = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, jax.random.key(3))[0]))
  return grad(params)


@pytest.mark.parametrize('remat', ['dots', 'full'])
def test_remat_changes_no_number(remat):
  """Remat recomputes the forward pass in the backward pass; dropout keys included, the
  gradient is the one without remat."""
  (plain_loss, plain), (loss, recomputed) = _lm_grads('none'), _lm_grads(remat)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  # XLA fuses the recomputed graph differently: float32 rounding apart (per leaf, in norm)
  assert reference.rel_err(recomputed, plain) <= 1e-6
  assert reference.rel_err(recomputed, jax.tree.map(lambda g: g * 1.00001, plain)) > 1e-6


def test_remat_keeps_less_for_the_backward_pass():
  batch = {'inputs': jax.ShapeDtypeStruct((2, 16), jnp.int32),
           'targets': jax.ShapeDtypeStruct((2, 16), jnp.int32),
           'mask': jax.ShapeDtypeStruct((2, 16), jnp.float32)}
  saved = {}
  for remat in layers.REMATS:
    apply, params = model.make_lm(dataclasses.replace(LM, remat=remat), abstract=True)
    saved[remat] = layers.saved_activation_bytes(make_loss_fn(apply), params, batch)
  assert saved['none'] > saved['dots'] > saved['full'] > 0, saved


def test_stacked_blocks_are_one_array_per_leaf():
  _, params = model.make_lm(LM, abstract=True)
  assert {x.shape[0] for x in jax.tree.leaves(params['blocks'])} == {LM.num_layers}
  assert not any(k.startswith('block0') for k in params)


def test_rows_of_every_group_make_a_microbatch():
  rows = jnp.arange(12)
  split = accumjax.split_microbatches({'x': rows}, 3, row_groups=2)['x']
  # group 0 holds rows 0-5, group 1 rows 6-11; micro-batch j: the j-th pair of each group
  np.testing.assert_array_equal(split, [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]])
  with pytest.raises(ConfigError, match='row_groups=5'):
    accumjax.split_microbatches({'x': rows}, 3, row_groups=5)


def test_bad_layer_arguments_are_refused():
  with pytest.raises(ConfigError, match="remat='some'; allowed: none, dots, full"):
    model.make_lm(dataclasses.replace(LM, remat='some'))
  with pytest.raises(ConfigError, match='same leading layer axis'):
    layers.scan_layers(lambda p, x: x, jnp.ones(2), {'a': jnp.ones((3, 2)), 'b': jnp.ones((4,))})
  with pytest.raises(ConfigError, match="fsdp_gather='each'; allowed: call, layer"):
    accumjax.AccumConfig(num_microbatches=2, microbatch_size=1, fsdp_gather='each')


def test_live_set_account_adds_up():
  _, params = model.make_lm(LM, abstract=True)
  config = accumjax.AccumConfig(num_microbatches=4, microbatch_size=2, fsdp_gather='layer')
  tx = accumjax.accumulating_optimizer(optax.adamw(1e-3), config)
  state = jax.eval_shape(lambda p: accumjax.init_train_state(p, tx, 0, config), params)
  with pytest.raises(ConfigError, match='needs stacked='):
    state_lib.live_bytes_per_device(state, config, fsdp=4)
  layer = state_lib.live_bytes_per_device(state, config, 4, stacked=params['blocks'],
                                          activation_bytes=1000, layer_bytes=300)
  call = state_lib.live_bytes_per_device(
      state, dataclasses.replace(config, fsdp_gather='call'), 4, activation_bytes=1000,
      layer_bytes=300)
  assert layer['total'] == sum(v for k, v in layer.items() if k != 'total')
  described = accumjax.describe(config, state, fsdp=4, stacked=params['blocks'],
                                activation_bytes=1000, layer_bytes=300)
  assert described['live_bytes_per_device'] == layer
  assert (layer['activations'], layer['layer_working']) == (1000, 150)
  # one layer at a time: less gathered and less gradient than the whole params
  assert layer['gathered_params'] < call['gathered_params']
  assert layer['microbatch_gradient'] < call['microbatch_gradient']


def test_gpu_bench_runs_here_at_a_tiny_size(tmp_path):
  """The GPU benchmark, run on this CPU at a tiny size: known to work the day a GPU is lent."""
  from experiments import gpu_bench
  out = tmp_path / 'gpu_bench.md'
  rows = gpu_bench.main(['--tiny', '--ks', '2', '--remats', 'none,full', '--updates', '1',
                         '--out', str(out)])
  assert [(r['remat'], r['k']) for r in rows] == [('none', 2), ('full', 2)]
  assert all(r['tokens_per_s'] > 0 and r['compiled_bytes'] > 0 for r in rows)
  text = out.read_text()
  assert 'python -m experiments.gpu_bench --tiny' in text and 'MFU' in text
  assert text.count('\n| full |') == 1
