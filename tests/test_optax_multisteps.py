"""optax's own MultiSteps tests, run against accumjax.LazyMultiSteps.

The test module ships inside the installed optax wheel (`optax/transforms/
_accumulation_test.py`); it is imported from there, not copied. Each test runs with
`optax.transforms._accumulation.MultiSteps` replaced by a recording subclass of
`LazyMultiSteps`, so every test that builds a MultiSteps builds ours, and the run fails if one
of them did not (a test that silently used optax's class would prove nothing).
"""

# Plain imports, not importorskip: a missing absl or flax must fail the suite, not skip it.
from optax.transforms import _accumulation
from optax.transforms import _accumulation_test as optax_tests

import accumjax

_ORIGINAL = _accumulation.MultiSteps
BUILT = []


class _Recording(accumjax.LazyMultiSteps):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    BUILT.append(self)


class LazyMultiStepsAsOptaxTest(optax_tests.AccumulationTest):
  """Every test of optax's AccumulationTest, with MultiSteps swapped for LazyMultiSteps."""

  def setUp(self):
    super().setUp()
    BUILT.clear()
    _accumulation.MultiSteps = _Recording
    self.addCleanup(setattr, _accumulation, 'MultiSteps', _ORIGINAL)

  def tearDown(self):
    if 'multi_steps' in self._testMethodName:
      assert BUILT, f'{self._testMethodName} built no LazyMultiSteps'
      assert all(isinstance(x, accumjax.LazyMultiSteps) for x in BUILT)
    super().tearDown()


def test_the_optax_tests_cover_every_multisteps_feature():
  names = [n for n in dir(optax_tests.AccumulationTest) if n.startswith('test_multi_steps')]
  # optax 0.2.8: plain pytrees, has_updated, a callable schedule, dtype stability under scan,
  # zero_nans in a chain, use_grad_mean=True, should_skip_update_fn, mixed precision.
  assert len(names) >= 8, names
