"""The flags and the report file every study experiment shares (the task itself is
`accumjax.studies.lm_task`)."""

import argparse
import pathlib


def parse_args(doc: str, argv) -> argparse.Namespace:
  """--quick and --out, the flags every batch experiment has."""
  p = argparse.ArgumentParser(description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help='the small CI variant')
  p.add_argument('--out', default=None, help='markdown path (default benchmarks/...)')
  return p.parse_args(argv)


def write_report(text: str, name: str, args) -> pathlib.Path:
  """Writes the markdown table to `--out` or benchmarks/NAME[-quick].md; returns its path (the
  plot goes beside it, `.with_suffix('.png')`)."""
  root = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'
  out = pathlib.Path(args.out) if args.out else root / f'{name}{"-quick" if args.quick else ""}.md'
  out.write_text(text)
  return out
