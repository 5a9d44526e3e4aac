"""Counting cross-device collectives in a compiled HLO module (benchmarks and tests).

Used to check that accumjax's step reduces once per call, not once per micro-batch
(tests/test_parallel.py, tests/test_fsdp.py, experiments.bench_dp).
"""

import re

_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.-]+) .*\{$')
_CALLED = re.compile(r'(?:body|condition|calls|to_apply|branch_computations)=\{?([^,}\s]+'
                     r'(?:, *%[\w.-]+)*)\}?')
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def _computations(hlo_text: str) -> dict:
  """{computation name: its instruction lines} of a compiled HLO module ('ENTRY' for the
  entry computation)."""
  computations, name = {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      name = 'ENTRY' if line.startswith('ENTRY') else match.group(1)
      computations[name] = []
    elif name is not None and line.strip() and line.strip() != '}':
      computations[name].append(line)
  return computations


def _op_of(line: str):
  for op in _COLLECTIVES:
    if re.search(rf'\s{op}(?:-start)?\(', line):
      return op
  return None


def collective_lines(hlo_text: str) -> list[tuple[str, int, str]]:
  """(op, loop depth, HLO line) of every cross-device collective of a compiled module; depth 0
  is outside every while loop, 1 inside one (e.g. the micro-batch scan), 2 inside a loop in a
  loop (e.g. a layer scan inside the micro-batch scan). A computation reached at several
  depths counts at the deepest."""
  computations = _computations(hlo_text)
  depth = {'ENTRY': 0}
  frontier = ['ENTRY']
  while frontier:
    c = frontier.pop()
    for line in computations.get(c, ()):
      bodies = {b.lstrip('%') for b in re.findall(r'body=(%?[\w.-]+)', line)}
      for group in _CALLED.findall(line):
        for callee in (x.strip().lstrip('%') for x in group.split(',')):
          d = depth[c] + (callee in bodies)
          if callee in computations and depth.get(callee, -1) < d:
            depth[callee] = d
            frontier.append(callee)
  return [(op, depth[c], line) for c, lines in computations.items() if c in depth
          for line in lines for op in [_op_of(line)] if op is not None]


def collectives_by_depth(hlo_text: str) -> dict:
  """{op: {loop depth: count}} of the collectives (see `collective_lines`)."""
  counts = {}
  for op, depth, _ in collective_lines(hlo_text):
    counts.setdefault(op, {}).setdefault(depth, 0)
    counts[op][depth] += 1
  return counts


def collective_counts(hlo_text: str) -> dict:
  """Cross-device collectives in a compiled HLO module, inside vs outside while-loop bodies.

  Returns {op: {'in_loop': n, 'outside': m}} for the collectives present (an async pair
  `all-reduce-start`/`-done` counts once). Loop bodies include what they call.
  """
  counts = {}
  for op, depth, _ in collective_lines(hlo_text):
    counts.setdefault(op, {'in_loop': 0, 'outside': 0})['in_loop' if depth else 'outside'] += 1
  return counts
