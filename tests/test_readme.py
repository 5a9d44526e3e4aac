"""The README's promises that a test can hold: its "Your own model" block runs as written."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).parent.parent / 'README.md'


def test_the_own_model_example_runs_and_trains():
  text = README.read_text()
  section = text[text.index('## Your own model'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, 'README.md', 'exec'), {})  # noqa: S102 (the README's own code)
  updates, losses = zip(*[(int(u), float(v)) for u, v in
                          (line.split() for line in out.getvalue().splitlines())], strict=True)
  assert updates == tuple(range(1, 9))
  assert losses[-1] < 0.75 * losses[0]  # it trains (0.365 -> 0.226 measured)
