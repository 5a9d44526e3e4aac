"""Nothing silent, round 3: one test per family of the abuse report on the newer features
(each failed on the code before). The families of the model-state rules and of the loss_fn's
returns are in test_miswiring.py."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import accumjax
from accumjax.lm import config as lm_config
from accumjax.lm import guards
from accumjax.lm import run as run_lib
from experiments import train as train_cli
from tests.helpers import train_config

ROOT = pathlib.Path(__file__).parent.parent
TINY = ['--d-model', '32', '--layers', '1', '--heads', '2', '--seq-len', '32', '--batch-size',
        '2', '--eval-batches', '1', '--no-progress']


def _strict(text: str):
  """json.loads that refuses NaN and Infinity (as jq and JSON.parse do)."""
  def refuse(name):
    raise ValueError(f'not strict JSON: {name}')
  return json.loads(text, parse_constant=refuse)


def test_every_file_a_run_writes_is_strict_json_with_null_for_no_value(tmp_path):
  """A whole update non-finite (update 2: all four micro-batches NaN) with noise statistics
  on: its loss and noise estimates have no finite value."""
  out = tmp_path / 'run'
  faults = ','.join(f'2:{j}' for j in range(4))
  assert train_cli.main([*TINY, '--steps', '3', '--save-every', '1', '--eval-every', '3',
                         '--inject-faults', faults, '--out', str(out)]) == 0
  records = [_strict(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  second = next(r for r in records if r['kind'] == 'train' and r['update'] == 2)
  assert second['skipped'] and second['loss'] is None and second['b_simple'] is None
  _strict((out / 'config.json').read_text())
  parsed = 0  # every JSON file Orbax wrote for the metadata (ours holds 'run' and 'config')
  for path in (out / 'checkpoints').rglob('*'):
    if path.is_file() and 'meta' in str(path) and path.stat().st_size < 10**6:
      text = path.read_text(errors='replace')
      if text.lstrip().startswith('{'):
        parsed += '"config"' in text and '"run"' in text
        _strict(text)
  assert parsed >= 3  # one per saved checkpoint at least: the test did read ours
  # and the run resumes from those files (null read back as no value)
  assert train_cli.main([*TINY, '--steps', '4', '--save-every', '1', '--eval-every', '3',
                         '--inject-faults', faults, '--out', str(out), '--resume']) == 0


def test_a_callable_k_below_one_is_refused_where_it_is_used():
  tx = accumjax.LazyMultiSteps(optax.sgd(0.1), every_k_schedule=lambda step: 0)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(accumjax.ConfigError, match=r'every_k_schedule\(0\) = 0; a K must be >= 1'):
    tx.update(params, state, params)
  jitted = jax.jit(lambda g, s: tx.update(g, s, params))
  with pytest.raises(Exception, match=r'every_k_schedule\(0\) = 0'):  # noqa: B017 (JAX's)
    jax.block_until_ready(jitted(params, state))


def test_float64_sums_without_64_bit_jax_are_refused_not_float32():
  assert not jax.config.jax_enable_x64
  with pytest.raises(accumjax.ConfigError, match="accum_dtype='float64' needs 64-bit JAX"):
    accumjax.AccumConfig(num_microbatches=2, microbatch_size=2, accum_dtype='float64')


def test_k_refusals_name_the_flag_that_set_k_and_auto_k_is_sized_for_the_ks_it_uses():
  cfg = train_config(grad_accum_schedule='0:2,1:1000000000000')
  with pytest.raises(accumjax.ConfigError, match=r'from --grad-accum-schedule .* lower '
                     r'--grad-accum-schedule') as e:
    guards.check_host_memory(cfg, lm_config.validate(cfg), 1)
  assert '--grad-accum-steps' not in str(e.value)
  # auto with --max-grad-accum-steps 7: K is 2 or 4, so the step is built for 4 and c = 2
  accum = lm_config.validate(train_config(grad_accum_steps='auto', max_grad_accum_steps=7,
                                          accum_mode='hybrid'))
  assert (accum.num_microbatches, accum.per_call) == (4, 2)


def test_refusals_say_what_to_do(tmp_path, capsys):
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  assert train_cli.main([*TINY, '--out', str(a_file)]) == 2
  assert 'give a directory' in capsys.readouterr().err
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'a.txt').write_text('Some training text.\n\nMore of it here.\n' * 50)
  (corpus / 'b.txt').write_text('')  # the held-out file: empty
  assert train_cli.main([*TINY, '--data', str(corpus), '--out', str(tmp_path / 'r')]) == 2
  err = capsys.readouterr().err
  assert 'b.txt' in err and 'put text in those files' in err


def test_a_run_that_fails_after_taking_the_lock_gives_it_back(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(run_lib.parallel, 'place_state', broken)
  out = tmp_path / 'run'
  with pytest.raises(OSError):
    run_lib.build_run(train_config(d_model=32, num_layers=1, num_heads=2, seq_len=32,
                                   batch_size=2), out, None)
  assert not (out / '.lock').exists()


def test_a_write_failure_before_any_checkpoint_does_not_claim_one(tmp_path, monkeypatch,
                                                                  capsys):
  def full(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr('accumjax.lm.train.open_outputs', full)
  out = tmp_path / 'run'
  assert train_cli.main([*TINY, '--steps', '2', '--out', str(out)]) == 1
  err = capsys.readouterr().err
  assert 'No checkpoint was committed' in err and 'is intact' not in err
  assert not (out / '.lock').exists()


EVAL_ROWS = """
import json, sys
from accumjax.lm import run as run_lib
from tests.helpers import train_config
cfg = train_config(d_model=32, num_layers=1, num_heads=2, seq_len=32, batch_size=int(sys.argv[1]),
                   eval_batches=2, save_every=0)
run = run_lib.build_run(cfg, sys.argv[2], None)
print(json.dumps({'rows': run.info['eval_rows_used'], 'loss': run_lib.evaluate(run)['loss']}))
run.lock.release()
"""


def test_eval_depends_on_the_global_batch_not_the_device_count(tmp_path):
  results = []
  for devices, batch in ((1, 8), (4, 2)):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    argv = [sys.executable, '-c', EVAL_ROWS, str(batch), str(tmp_path / str(devices))]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results.append(json.loads(done.stdout.strip().splitlines()[-1]))
  assert results[0]['rows'] == results[1]['rows'] == 16
  assert results[0]['loss'] == pytest.approx(results[1]['loss'], rel=1e-5)
