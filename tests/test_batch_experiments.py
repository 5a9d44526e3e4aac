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


@pytest.mark.slow
def test_batch_study_quick(tmp_path):
  from experiments import batch_study
  out = tmp_path / 'bs.md'
  result = batch_study.main(['--quick', '--out', str(out)])
  from accumjax.studies import batch_study as bs
  s = bs.SETTINGS['quick']
  total = s['updates'] * bs.MICRO * max(s['ks'])
  for r in result['sweep'] + result['rules']:  # equal tokens: every run read the same rows
    assert r['curve'][-1][1] == total and r['curve'][-1][0] == total // r['batch']
    assert math.isfinite(r['at_updates'])
  assert len(result['rules']) == len(s['ks']) * len(bs.RULES) * s['seeds']
  text = out.read_text()
  assert text.count('\n| ') == 1 + len(s['ks']) * len(bs.RULES) + 1 + len(s['ks'])
  assert '1. **"K = 4' in text and '2. **"double the batch' in text
  assert out.with_suffix('.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_batch_study_rules_scale_as_published():
  from accumjax.studies import batch_study as bs
  assert bs.rule_hparams('none', 1e-3, 64)['lr'] == 1e-3
  assert bs.rule_hparams('linear', 1e-3, 64)['lr'] == pytest.approx(16e-3)
  assert bs.rule_hparams('sqrt', 1e-3, 16)['lr'] == pytest.approx(2e-3)
  m = bs.rule_hparams('sqrt + Malladi', 1e-3, 8)  # kappa = 2
  assert m['b1'] == pytest.approx(0.8) and m['b2'] == pytest.approx(0.998)
  assert m['eps'] == pytest.approx(1e-8 / math.sqrt(2))
  assert bs.rule_hparams('sqrt + Malladi', 1e-3, 64)['b1'] == 0.0  # kappa (1 - b1) >= 1: clipped


@pytest.mark.slow
def test_batchnorm_quick(tmp_path):
  from experiments import batchnorm
  out = tmp_path / 'bn.md'
  result = batchnorm.main(['--quick', '--out', str(out)])
  by = {(e['when'], e['method'], e['k']): e['error'] for e in result['errors']}
  assert by[('init', 'GroupNorm', 8)] < 1e-5 and by[('init', 'LayerNorm', 8)] < 1e-5
  assert by[('init', 'BatchNorm, micro-batch statistics', 8)] > by[
      ('init', 'BatchNorm, micro-batch statistics', 2)] > 1e-2  # grows with K
  assert result['averages'][('mean', 'norm1', 'mean')] < 1e-5
  group = result['runs']['GroupNorm, big batch'][0][0], result['runs']['GroupNorm, K=8'][0][0]
  assert max(abs(a - b) for a, b in zip(*group, strict=True)) < 1e-3
  assert out.with_suffix('.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
