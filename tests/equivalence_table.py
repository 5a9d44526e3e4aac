"""Prints (and writes to benchmarks/equivalence.md) the measured errors of the equivalence
matrix that tests/test_equivalence.py asserts: K x mode x optimizer against the full batch.

    python -m tests.equivalence_table      # ~1 minute on 2 CPU cores
"""

import pathlib

import numpy as np

from tests import reference
from tests.helpers import run_accumjax
from tests.test_equivalence import OPTIMIZERS, ROWS, STEPS, config_for, reference_result

COMMAND = 'python -m tests.equivalence_table'


def main():
  rows = ['| K | mode | optimizer | params rel. error | max loss rel. error |',
          '|---|---|---|---|---|']
  worst = 0.0
  for k in (1, 2, 3, 4, 8):
    for mode in ('scan', 'multisteps', 'hybrid'):
      for opt_name in ('sgd', 'adamw'):
        ref_params, ref_losses = reference_result(opt_name)
        state, losses, _ = run_accumjax(
            reference.init_params(), reference.make_batches(STEPS, ROWS),
            OPTIMIZERS[opt_name](), config_for(mode, k))
        err = reference.rel_err(state.params, ref_params)
        loss_err = float(np.max(np.abs(losses - ref_losses) / np.abs(ref_losses)))
        worst = max(worst, err, loss_err)
        rows.append(f'| {k} | {mode} | {opt_name} | {err:.2e} | {loss_err:.2e} |')
  text = '\n'.join([
      '# Equivalence matrix: accumjax vs one plain full batch', '',
      f'Command: `{COMMAND}`. fp32, {STEPS} updates, {ROWS} padded variable-length rows per '
      'update (sorted so micro-batches carry very different token counts). Errors are the '
      'largest per-leaf ||a - b|| / ||b|| of the final params, and the largest relative error '
      'of the per-update loss. Tolerance asserted in tests: 1e-5.', '', *rows, '',
      f'Worst: {worst:.2e}', ''])
  print(text)
  out = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks' / 'equivalence.md'
  out.write_text(text)


if __name__ == '__main__':
  main()
