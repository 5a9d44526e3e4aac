"""Every notebook runs top to bottom; their assertions are part of the suite."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / 'notebooks').glob('*.ipynb'))


# Every notebook (~35-50 s each) runs in the slow set, which CI runs too.
DEFAULT = set()  # the quickstart too (~35 s): the default run stays near 10 minutes


@pytest.mark.parametrize('path', [
    p if p.name in DEFAULT else pytest.param(p, marks=pytest.mark.slow) for p in NOTEBOOKS],
    ids=lambda p: p.name)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': str(path.parent)}}).execute()
  outputs = ''.join(o.get('text', '') for c in nb.cells for o in c.get('outputs', []))
  assert 'relative error' in outputs or 'loss' in outputs


def test_there_are_notebooks():
  assert NOTEBOOKS


# What a notebook may import: the library, JAX's stack, plotting and the standard library.
ALLOWED = {'accumjax', 'jax', 'numpy', 'optax', 'chex', 'flax', 'matplotlib', 'IPython', 'math',
           'pathlib', 'tempfile', 'json', 'time'}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_import_only_the_library_and_plotting(path):
  import ast
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type != 'code':
      continue
    for node in ast.walk(ast.parse(cell.source)):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
          [node.module] if isinstance(node, ast.ImportFrom) else []
      for name in names:
        assert name.split('.')[0] in ALLOWED, f'{path.name} imports {name}'
