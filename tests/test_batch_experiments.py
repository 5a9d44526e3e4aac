"""The batch-size experiments' --quick variants run end to end (slow: ~3 minutes together);
their outputs are checked for what the full runs report."""

import math

import pytest

from experiments import batch_ramp, critical_batch


@pytest.mark.slow
def test_critical_batch_quick(tmp_path):
  out = tmp_path / 'cb.md'
  assert critical_batch.main(['--quick', '--out', str(out)]) == 0
  text = out.read_text()
  assert 'B_crit = E_min / S_min' in text and 'B_crit / B_simple = ' in text
  ratio = float(text.split('B_crit / B_simple = ')[1].split('**')[0])
  assert math.isfinite(ratio) and ratio > 0
  assert out.with_suffix('.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_critical_batch_fit_recovers_a_known_curve():
  # S = 20 + 4000 / B exactly: S_min 20, E_min 4000, B_crit 200
  s_min, e_min = critical_batch.fit([(b, 20 + 4000 / b) for b in (8, 32, 128, 512)])
  assert s_min == pytest.approx(20) and e_min == pytest.approx(4000)


@pytest.mark.slow
def test_batch_ramp_quick(tmp_path):
  s = batch_ramp.SETTINGS['quick']
  setup = batch_ramp._setup(s)
  runs = {plan: batch_ramp.run_plan(s, plan, setup) for plan in ('fixed', 'ramp', 'auto')}
  per_mb = s['micro'] * s['seq']
  for r in runs.values():  # the same budget, to within one update
    assert s['budget'] <= r['records'][-1]['tokens'] < s['budget'] + s['auto_max'] * per_mb
  from accumjax import schedules
  ramp = schedules.parse_k_schedule(s['ramp'])
  assert [x['k'] for x in runs['ramp']['records']] == [
      ramp.at(u) for u in range(len(runs['ramp']['records']))]
  assert runs['ramp']['programs'] == len(ramp.ks)  # one scan program per K
  ks = [x['k'] for x in runs['auto']['records']]
  changes = [i for i in range(1, len(ks)) if ks[i] != ks[i - 1]]
  assert all(b - a >= batch_ramp.DWELL for a, b in zip([0] + changes, changes, strict=False))
  text = batch_ramp.report(s, list(runs.values()), 1.0, True)
  assert text.count('\n| ') == 4  # header and three plans


@pytest.mark.slow
def test_normalization_bug_quick(tmp_path):
  from experiments import normalization_bug
  out = tmp_path / 'nb.md'
  assert normalization_bug.main(['--quick', '--out', str(out)]) == 0
  text = out.read_text()
  assert '| packed (no padding) | 16 | 1.00 | 0.0000 |' in text  # equal counts: no bug
  assert out.with_suffix('.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
