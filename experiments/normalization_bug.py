"""The loss-normalisation bug of gradient accumulation, measured: token weighting vs a mean of
micro-batch means vs a sum divided by K, on padded variable-length text.

    python -m experiments.normalization_bug            # ~4 minutes on 2 CPU cores
    python -m experiments.normalization_bug --quick    # ~1 minute (CI smoke)

With micro-batches of different token counts w_j, the big batch's gradient is
sum_j S_j / sum_j w_j (S_j: micro-batch j's gradient of its summed token loss). What
accumjax computes (the sums, divided once) equals it. Two common shortcuts do not
(transformers fixed the first in 2024, PR 34191):

- mean of means: (1/K) sum_j S_j / w_j: every micro-batch counts the same, so the tokens of
  short micro-batches weigh more: a bias in direction;
- sum / K: (1/K) sum_j S_j: the right direction, but a magnitude that grows with the tokens
  per micro-batch (an effective learning rate that changes with the data).

1. Gradient error per update, ||g - g_big|| / ||g_big||, over real batches of the default
   corpus (seq 128, 32 rows), for K = 1..16 and three layouts of the same rows: shuffled (the
   natural spread of lengths), sorted by length (micro-batches as unequal as the rows allow),
   and packed (no padding: equal token counts).
2. Training curves: the same small model trained with each (SGD and Adam, sorted layout,
   K = 8), held-out loss vs updates.

Writes benchmarks/normalization_bug.md and .png.

Result (benchmarks/normalization_bug.md): the mean of means is 1-6% off the big-batch gradient
with rows shuffled and 6-13% with rows sorted by length (K = 2..16), 0 without padding; sum / K
has the right direction and tokens-per-micro-batch times the size (SGD diverges, Adam does not
notice). It did not cost held-out loss in this run (one seed).
"""

import time

from accumjax.studies.lm_task import make_task
from accumjax.studies.normalization_bug import SETTINGS, gradient_errors, plot, report, train_curves
from experiments import lm_task


def main(argv=None):
  a = lm_task.parse_args(__doc__, argv)
  s = SETTINGS['quick' if a.quick else 'full']
  start = time.time()
  task = make_task(s['model'], s['seq'], eval_rows=32, eval_batches=4)
  errors = gradient_errors(task, s)
  curves = train_curves(task, s)
  text = report(s, errors, curves, time.time() - start, a.quick)
  print(text)
  out = lm_task.write_report(text, 'normalization_bug', a)
  plot(errors, curves, out.with_suffix('.png'))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
