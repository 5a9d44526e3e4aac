"""The benchmark's --quick variant runs end to end (the numbers themselves live in
benchmarks/, measured, never asserted)."""

import pytest

from experiments import bench


@pytest.mark.slow
def test_bench_quick_runs_and_reports(tmp_path):
  out = tmp_path / 'RESULTS.md'
  assert bench.main(['--quick', '--out', str(out)]) == 0
  text = out.read_text()
  for variant in bench.VARIANTS:
    assert f'| {variant} | ' in text
  assert '## Ratios vs targets' in text
  assert (tmp_path / 'RESULTS.png').read_bytes()[:4] == b'\x89PNG'
  # No recompilation: one program per step (two for multisteps/hybrid: interim + last call).
  rows = [line.split('|') for line in text.splitlines() if line.startswith('| ')]
  compilations = {r[1].strip(): int(r[8]) for r in rows if len(r) == 10 and r[8].strip().isdigit()}
  assert compilations['full'] == compilations['scan'] == 1
  assert compilations['multisteps_lazy'] == compilations['hybrid'] == 2


@pytest.mark.slow
def test_bench_lazy_quick_writes_its_table(tmp_path):
  out = tmp_path / 'lazy.md'
  assert bench.main(['--lazy', '--quick', '--out', str(out)]) == 0
  rows = [line.split('|') for line in out.read_text().splitlines() if line.startswith('| 0.1M (')]
  assert len(rows) == 1 and len(rows[0]) == 12  # 10 columns, every ratio a number
  assert rows[0][3].strip() == '7 x 20'
  target = rows[0][5].split()  # median (25th-75th percentile)
  assert float(target[0]) > 0 and target[1].startswith('(') and target[1].endswith(')')
  assert all(float(x.split()[0]) > 0 for x in rows[0][4:-1])


@pytest.mark.slow
def test_bench_core_quick_checks_every_variant_and_writes_its_table(tmp_path):
  """Every variant is checked equal to the full batch before it is timed (bench_core)."""
  out = tmp_path / 'core.md'
  assert bench.main(['--core', '--quick', '--out', str(out)]) == 0
  rows = [line.split('|') for line in out.read_text().splitlines() if line.startswith('| tiny (')]
  assert len(rows) == 1 and all(float(x.split()[0]) > 0 for x in rows[0][5:-1])


@pytest.mark.slow
def test_bench_emit_quick_checks_the_updates_agree_and_writes_its_table(tmp_path):
  """The completing-step bench checks every update program against its plain optax reference
  before timing (bench_emit.check), and writes every ratio as a number."""
  out = tmp_path / 'emit.md'
  assert bench.main(['--emit', '--quick', '--out', str(out)]) == 0
  rows = [line.split('|') for line in out.read_text().splitlines() if line.startswith('| 0.1M')]
  assert len(rows) == 2  # the ratios and the parts
  assert 'compile on this backend' in out.read_text()
  assert all(float(x.split()[0]) > 0 for row in rows for x in row[4 if '(' in row[1] else 2:-1])
  from experiments import bench_emit
  ops = bench_emit.profile('hand-written accumulator, completing call', '0.1M', calls=2)
  assert ops and all(ms >= 0 for ms, _ in ops) and any('fusion' in op for _, op in ops)


def test_bench_emit_fusion_probe_counts_passes():
  """The probe behind emit.md's fusion sentence: element-wise ops are one pass, a division by
  the array's own sum two (the sum must end before the division starts; the scalar work between
  is no pass), and the add-then-norm probe one or two."""
  import jax
  import jax.numpy as jnp

  from experiments import bench_emit
  x = jax.ShapeDtypeStruct((1 << 16,), jnp.float32)
  assert bench_emit.passes_over(lambda a: a * 2 + 1, x) == 1
  assert bench_emit.passes_over(lambda a: a / jnp.sum(a), x) == 2
  assert bench_emit.passes_over(lambda a, b: a / jnp.sum(b), x, x) == 2
  assert bench_emit.fusion_probe(1 << 16) in (1, 2)
  # A backend that fuses the add and the norm returns both from one fusion, typed as a tuple:
  # one pass (its result holds the array), not zero.
  fused = """HloModule m

ENTRY %main (a: f32[8], b: f32[8]) -> (f32[8], f32[]) {
  %a = f32[8]{0} parameter(0)
  %b = f32[8]{0} parameter(1)
  ROOT %f = (f32[8]{0}, f32[]) fusion(%a, %b), kind=kInput, calls=%c
}
"""
  assert bench_emit.passes_in(fused, (8,)) == 1
  assert bench_emit.passes_in(fused.replace('ROOT %f', '%f'), (8,)) == 1
  assert bench_emit.passes_in(fused, (9,)) == 0


def test_bench_emit_check_catches_a_wrong_update():
  """The agreement check fails when one program's update is not its reference's."""
  import jax.numpy as jnp

  from experiments import bench_emit
  progs, _ = bench_emit.programs(dict(d_model=16, num_layers=1, num_heads=2))
  assert bench_emit.check(progs) < 1e-6
  progs, _ = bench_emit.programs(dict(d_model=16, num_layers=1, num_heads=2))
  fn, state, (sums,) = progs['accumjax emitting, scan mode']
  progs['accumjax emitting, scan mode'] = (fn, state, (sums._replace(weight=sums.weight * 2),))
  with pytest.raises(AssertionError, match='scan mode'):
    bench_emit.check(progs)
  del jnp
