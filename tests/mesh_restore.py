"""Helper for tests/test_preemption.py: save on N fake CPU devices, restore on another count.

    XLA_FLAGS=--xla_force_host_platform_device_count=N python -m tests.mesh_restore save|restore DIR

Prints one JSON line: device count, the step and fingerprint handled, and the restored leaves'
device count. The state is replicated over a 1-D data mesh of all devices.
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import accumjax
from accumjax import checkpoint
from tests import reference
from tests.helpers import calls_of, lm_loss
from tests.test_equivalence import ROWS, adamw, config_for


def main(action, directory):
  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated = NamedSharding(mesh, PartitionSpec())
  config = config_for('multisteps', 4)
  tx = accumjax.accumulating_optimizer(adamw(), config)
  fresh = jax.device_put(accumjax.init_train_state(reference.init_params(), tx, 0), replicated)
  ckpt = checkpoint.Checkpointer(directory)
  if action == 'save':  # 6 micro-batches: mid-cycle of the second update
    step = accumjax.jit_train_step(accumjax.make_train_step(lm_loss, tx, config))
    state = fresh
    for c in calls_of(reference.make_batches(2, ROWS)[0], config) + calls_of(
        reference.make_batches(2, ROWS)[1], config)[:2]:
      state = step(state, c)[0]
    saved = ckpt.save(state, {})
    ckpt.wait()
    result = {'step': saved, 'fingerprint': checkpoint.fingerprint(state)}
  else:
    restored = ckpt.restore(lambda meta: fresh)
    leaf = restored.state.params['w1']
    result = {'step': restored.step, 'fingerprint': checkpoint.fingerprint(restored.state),
              'leaf_devices': len(leaf.sharding.device_set)}
    # Re-save from this device count (one step later) for the next hop.
    ckpt.save(restored.state._replace(microbatch_step=restored.state.microbatch_step + 1), {})
    ckpt.wait()
  ckpt.close()
  print(json.dumps({'devices': jax.device_count(), **result}))


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
