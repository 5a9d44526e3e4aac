"""FSDP: params, optimizer state and accumulator sharded over a mesh's `fsdp` axis give the
one-device (big-batch) updates in every mode and under both reduce-scatter policies, hold a
quarter of the state per device at fsdp=4, and restore across meshes mid-cycle.

The multi-device checks run in a subprocess with 4 fake CPU devices (tests/fsdp_check.py, ~90 s:
marked slow, run by CI); the two-process run is in tests/test_parallel.py.
"""


import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import accumjax
from accumjax import checkpoint, parallel
from accumjax import state as state_lib
from accumjax.core import ConfigError
from accumjax.lm import build as lm_build
from tests import reference
from tests.helpers import calls_of, lm_loss
from tests.test_equivalence import OPTIMIZERS, ROWS, STEPS, TOL
from tests.test_parallel import device_check

MODES = ('scan', 'multisteps', 'hybrid')
K = 4


@pytest.fixture(scope='module')
def fsdp(tmp_path_factory):
  return device_check('tests.fsdp_check', tmp_path_factory.mktemp('fsdp') / 'checkpoints')


@pytest.mark.slow
def test_ran_on_four_devices(fsdp):
  assert fsdp['devices'] == 4


@pytest.mark.slow
@pytest.mark.parametrize('mode', MODES)
def test_fsdp_meshes_give_the_big_batch_updates_on_padded_data(fsdp, mode):
  errors = {k: v for k, v in fsdp['errors'].items() if k.startswith(mode + '/')}
  # 1 device vs reference; {fsdp=4, data=2,fsdp=2} x {call, microbatch} x {reference, 1 device}
  # (+ fsdp=4 with the accumulator in host memory, outside scan mode)
  assert len(errors) == 9 + (mode != 'scan'), errors
  assert max(errors.values()) <= TOL, errors


@pytest.mark.slow
def test_host_memory_accumulator_with_sharded_state(fsdp):
  for mode in ('multisteps', 'hybrid'):
    layout = fsdp['layouts'][f'{mode}/fsdp=4/microbatch/host accumulator']
    assert layout['accumulator_memory'] == ['pinned_host'], layout
    assert fsdp['layouts'][f'{mode}/fsdp=4/microbatch']['accumulator_memory'] == ['device']


@pytest.mark.slow
def test_a_scatter_that_does_not_sum_over_fsdp_would_be_caught(fsdp):
  assert min(fsdp['unsummed_scatter_error'].values()) > 100 * TOL, fsdp['unsummed_scatter_error']


@pytest.mark.slow
@pytest.mark.parametrize('policy', ['call', 'microbatch'])
def test_nan_on_one_device_stays_out_of_every_shard(fsdp, policy):
  r = fsdp['nan_on_one_device'][policy]
  assert r['finite'] and not r['skipped'] and r['nonfinite'] == 1, r
  assert r['error_vs_remaining'] <= TOL, r


@pytest.mark.slow
def test_params_stay_sharded_after_training(fsdp):
  """Every leaf of the reference model has a dimension 4 divides: after 3 updates each is
  still split over fsdp, each device holding a quarter (replicated params would fail)."""
  full = {'embed': [32, 16], 'prev': [32, 16], 'w1': [16, 24], 'b1': [24], 'out': [24, 32]}
  for mode in MODES:
    for policy in ('call', 'microbatch'):
      layout = fsdp['layouts'][f'{mode}/fsdp=4/{policy}']
      for name, shape in full.items():
        assert 'fsdp' in layout['specs'][name], (mode, policy, layout)
        assert np.prod(layout['shard_shapes'][name]) * 4 == np.prod(shape), (name, layout)


@pytest.mark.slow
@pytest.mark.parametrize('mode', MODES)
def test_state_and_accumulator_per_device_is_a_quarter_at_fsdp_4(fsdp, mode):
  programs = fsdp['programs']
  dp, sharded = programs[f'{mode}/data=4/call'], programs[f'{mode}/fsdp=4/call']
  for part in ('params', 'opt_state', 'accumulator'):
    full, mine = dp['state_bytes'][part], sharded['state_bytes'][part]
    assert mine <= 0.3 * full if full else mine == 0, (part, full, mine)
  # XLA's own accounting of the compiled step: the state arguments per device.
  last_dp, last = dp['last'], sharded['last']
  assert last['state_argument_bytes'] <= 0.3 * last_dp['state_argument_bytes'], (last_dp, last)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', ['fsdp=4', 'data=2,fsdp=2'])
def test_collectives_per_policy(fsdp, mesh):
  """One params all-gather per call, outside the scan; the gradient reduce-scatter once per
  call after the scan ('call') or once per micro-batch inside it ('microbatch')."""
  call = fsdp['programs'][f'scan/{mesh}/call']['last']['collectives']
  micro = fsdp['programs'][f'scan/{mesh}/microbatch']['last']['collectives']
  assert call['all-gather'] == micro['all-gather'] == {'in_loop': 0, 'outside': 1}
  assert call['reduce-scatter'] == {'in_loop': 0, 'outside': 1}, call
  assert micro['reduce-scatter'] == {'in_loop': 1, 'outside': 0}, micro
  # Only scalars/shards are all-reduced, never inside the loop.
  assert call['all-reduce']['in_loop'] == micro['all-reduce']['in_loop'] == 0
  dp = fsdp['programs']['scan/data=4/call']['last']['collectives']
  assert dp == {'all-reduce': {'in_loop': 0, 'outside': 1}}, dp


@pytest.mark.slow
def test_microbatch_policy_needs_less_temporary_memory(fsdp):
  """The 'microbatch' scan carries only a shard of the sums (compiled temp bytes per device)."""
  programs = fsdp['programs']
  assert programs['scan/fsdp=4/microbatch']['last']['temp_bytes'] < \
      programs['scan/fsdp=4/call']['last']['temp_bytes']


@pytest.mark.slow
def test_checkpoint_restores_across_meshes_mid_cycle(fsdp):
  r = fsdp['restore']
  assert r['saved']['cycle_microbatch'] == 2
  hop = r['data=2,fsdp=2']
  assert hop['fingerprint'] == r['saved']['fingerprint'], r
  assert hop['mesh'] == {'data': 2, 'fsdp': 2}
  assert hop['params_spec'] == hop['accumulator_spec'] == "P(None, 'fsdp')", hop
  assert hop['accumulator_shard'] == [16, 12], hop  # w1 is [16, 24]: half per fsdp device
  assert r['1 device'] == {'cycle_microbatch': 3, 'devices': 1}, r
  assert r['updates'] == 3
  assert r['error_vs_uninterrupted'] <= TOL, r


@pytest.mark.parametrize('shape,fsdp,spec', [
    ((32, 16), 4, P('fsdp')), ((16, 24), 4, P(None, 'fsdp')), ((24,), 4, P('fsdp')),
    ((6, 6), 4, P()), ((), 4, P()), ((3, 8), 2, P(None, 'fsdp')), ((8, 8), 2, P('fsdp')),
    ((32, 16), 1, P()), ((2,), 4, P())])
def test_leaf_spec_splits_the_largest_dimension_that_divides(shape, fsdp, spec):
  assert parallel.leaf_spec(shape, fsdp) == spec


def test_bad_meshes_and_policies_are_refused():
  with pytest.raises(ConfigError, match=r'fsdp=3.*allowed: \[1\]'):
    parallel.make_mesh(fsdp=3)
  with pytest.raises(ConfigError, match='fsdp_reduce=.each.; allowed: call, microbatch'):
    accumjax.AccumConfig(num_microbatches=2, microbatch_size=1, fsdp_reduce='each')
  assert lm_build.parse_mesh('data=2,fsdp=2') == (2, 2)
  assert lm_build.parse_mesh('fsdp=4') == (None, 4)
  assert lm_build.parse_mesh('data=4') == (4, 1)
  assert lm_build.parse_mesh(None) == (None, 1)
  for bad in ('fsdp=0', 'data=2,data=2', 'model=2', 'fsdp=x', 'data=2;fsdp=2'):
    with pytest.raises(ConfigError, match=r'--mesh .*allowed: auto, data=D, fsdp=F'):
      lm_build.parse_mesh(bad)


def test_state_bytes_per_device_counts_what_one_device_holds():
  config = accumjax.AccumConfig(num_microbatches=2, microbatch_size=1, mode='multisteps')
  tx = accumjax.accumulating_optimizer(optax.adam(0.1), config)
  state = accumjax.init_train_state({'w': np.ones((4, 8), np.float32)}, tx, 0)
  # params 32 floats; adam's mu and nu 2 x 32 floats and its count; the cycle 32 floats + its 3
  # scalar sums (loss sum, weight, non-finite count) + its 2 counters (position, first bad).
  assert state_lib.state_bytes_per_device(state) == {
      'params': 128, 'opt_state': 256 + 4, 'accumulator': 128 + 12 + 8}


def _host_run(mode, memory, directory=None):
  """3 AdamW updates on one device, K=4; with `directory`, saved and restored (into the same
  layout) mid-cycle of update 2. Returns the final state."""
  config = accumjax.AccumConfig(num_microbatches=K, microbatch_size=ROWS // K, mode=mode,
                                microbatches_per_call=2 if mode == 'hybrid' else None,
                                accumulator_memory=memory)
  tx = accumjax.accumulating_optimizer(OPTIMIZERS['adamw'](), config)
  fresh = accumjax.init_train_state(reference.init_params(), tx, 0, config)
  step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config))
  state = fresh
  for u, batch in enumerate(reference.make_batches(STEPS, ROWS)):
    calls = calls_of(batch, config)
    if u == 1 and directory is not None:
      state = step(state, calls[0], last_call=False)[0]
      ckpt = checkpoint.Checkpointer(directory)
      ckpt.save(state, {})
      ckpt.wait()
      state = ckpt.restore(lambda meta: fresh).state
      ckpt.close()
      calls = calls[1:]
    state = accumjax.run_update(step, state, calls, config).state
  return state


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['multisteps', 'hybrid'])
def test_host_memory_accumulator_is_the_same_math(mode, tmp_path):
  """accumulator_memory='host': the sums between calls stay in pinned_host memory (also
  through a mid-cycle checkpoint) and the params are bitwise those of the device accumulator
  (on this CPU backend both kinds are the same RAM: this tests the mechanism, not a saving)."""
  device = _host_run(mode, 'device')
  host = _host_run(mode, 'host', tmp_path / 'ckpt')
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(host.cycle.sums.grads)}
  assert kinds == {'pinned_host'}, kinds
  assert {x.sharding.memory_kind for x in jax.tree.leaves(device.cycle.sums.grads)} == \
      {'device'}
  assert checkpoint.fingerprint(host.params) == checkpoint.fingerprint(device.params)


def test_host_memory_accumulator_needs_calls_to_keep_it_between():
  with pytest.raises(ConfigError, match=r"accumulator_memory='host' .* scan mode with K=4 "
                                        'makes one call per update'):
    accumjax.AccumConfig(num_microbatches=4, microbatch_size=1, accumulator_memory='host')
  with pytest.raises(ConfigError, match='accumulator_memory=.gpu.; allowed: device, host'):
    accumjax.AccumConfig(num_microbatches=4, microbatch_size=1, mode='multisteps',
                         accumulator_memory='gpu')
