"""Byte-level text data: the embedded default corpus and a deterministic, resumable iterator.

The default corpus needs no download: the `.py` sources of the running interpreter's standard
library (test directories and site-packages excluded), read in sorted path order. On CPython
3.11.7 that is 734 files, 12.1 MB. Every 20th file (sorted order) is held out for eval, so
train and eval never share a file.

Examples are the paragraphs of a file (runs of lines between blank lines) followed by EOS, cut
into windows of at most seq_len + 1 bytes. They have very different lengths (seq_len 128: a
median of 129 tokens, a quarter under 81, 5% under 20), so batches are padded with a mask and
micro-batches carry different token counts: the case where token-weighted normalisation
matters. `pack=True` instead concatenates all paragraphs into one stream cut into full windows
(no padding; attention may cross paragraph boundaries).

A second built-in corpus, of English prose, also needs no download: `--data builtin:prose` is
the documentation that ships with Python in `pydoc_data/topics.py` (the language reference's
topics, e.g. "The assert statement"; on CPython 3.11.7: 79 topics, 0.46 MB of text), one topic
per "file" (sorted by name), so that a finding can be checked on more than one kind of text.
`builtin:stdlib` names the default.

Not here: device placement or sharding (see parallel.py).
"""

import dataclasses
import hashlib
import pathlib
import re
import sysconfig

import numpy as np

PAD, EOS = 256, 257
VOCAB_SIZE = 258
_EXCLUDED_DIRS = {'site-packages', 'test', 'tests', 'idle_test', '__pycache__'}
_BLOCK_SPLIT = re.compile(rb'\n(?:[ \t]*\n)+')
TEXT_SUFFIXES = {'.py', '.txt', '.md', '.rst', '.c', '.h', '.json', '.toml', '.cfg', '.ini'}


class DataError(ValueError):
  """A missing or unusable data path."""


def default_corpus_files() -> list[pathlib.Path]:
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  return sorted(
      p for p in root.rglob('*.py')
      if not _EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))


def _prose_texts() -> list[bytes]:
  from pydoc_data import topics
  return [topics.topics[name].encode() for name in sorted(topics.topics)]


BUILTIN = ('builtin:stdlib', 'builtin:prose')


def describe_corpus(path: str | None) -> str:
  """How a run names its data (banner, config.json)."""
  if path in (None, 'builtin:stdlib'):
    return f'python stdlib sources ({default_corpus_files()[0].parent})'
  if path == 'builtin:prose':
    return 'python documentation prose (pydoc_data/topics.py)'
  return path


def corpus_texts(path: str | None) -> list[bytes]:
  """The texts of a corpus, one per file: a built-in one, or the files of `path`."""
  if path == 'builtin:prose':
    return _prose_texts()
  texts = []
  for f in corpus_files(None if path == 'builtin:stdlib' else path):
    try:
      texts.append(f.read_bytes())
    except OSError as e:
      raise DataError(f'--data: cannot read {str(f)!r}: {e.strerror or e}. Make it readable '
                      '(chmod a+r), or give a --data without it.') from None
  return texts


def corpus_files(path: str | None) -> list[pathlib.Path]:
  """The files of `path` (a text file or a directory of them), or the default corpus."""
  if path is None:
    return default_corpus_files()
  p = pathlib.Path(path)
  if p.is_symlink():
    try:
      p.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # a loop, or a link to nothing
      raise DataError(f'--data {path!r} is a symbolic link that cannot be followed ({e}); '
                      'give a text file or a directory.') from None
  if not p.exists():
    raise DataError(f'--data {path!r} does not exist; give a text file or a directory.')
  if p.is_file():
    return [p]
  files = sorted(f for f in p.rglob('*') if f.is_file() and f.suffix in TEXT_SUFFIXES)
  if not files:
    raise DataError(
        f'--data {path!r} has no text files (suffixes: {", ".join(sorted(TEXT_SUFFIXES))}).')
  return files


@dataclasses.dataclass
class Split:
  """Rows of seq_len + 1 token ids (PAD-filled) and the number of real tokens in each."""
  tokens: np.ndarray   # [N, seq_len + 1] uint16
  lengths: np.ndarray  # [N] int32
  num_files: int
  num_bytes: int
  fingerprint: str = ''  # sha256 (16 hex digits) of the split's files' bytes, in order

  @property
  def num_tokens(self) -> int:
    return int(self.lengths.sum())


def _windows(blocks: list[bytes], seq_len: int, pack: bool) -> tuple[np.ndarray, np.ndarray]:
  width = seq_len + 1
  ids = [np.concatenate([np.frombuffer(b, np.uint8).astype(np.uint16), [EOS]]) for b in blocks]
  if pack:
    stream = np.concatenate(ids) if ids else np.zeros((0,), np.uint16)
    n = len(stream) // width
    return stream[:n * width].reshape(n, width), np.full((n,), width, np.int32)
  pieces = [x[s:s + width] for x in ids for s in range(0, len(x), width)]
  pieces = [x for x in pieces if len(x) >= 2]  # one token predicts nothing
  tokens = np.full((len(pieces), width), PAD, np.uint16)
  lengths = np.array([len(x) for x in pieces], np.int32)
  for i, x in enumerate(pieces):
    tokens[i, :len(x)] = x
  return tokens, lengths


def load_splits(path: str | None, seq_len: int, pack: bool = False, eval_every: int = 20):
  """(train, eval) Splits; every `eval_every`-th file goes to eval (with fewer files, the last
  one; with a single file, its last 5%)."""
  texts = corpus_texts(path)
  names = [str(f) for f in corpus_files(path)] if path and not path.startswith('builtin:') \
      else [f'file {i}' for i in range(len(texts))]
  if len(texts) == 1:  # a single file: hold out its last 5%
    cut = int(len(texts[0]) * 0.95)
    parts = {'train': [texts[0][:cut]], 'eval': [texts[0][cut:]]}
    held = {'train': [f'the first 95% of {names[0]}'], 'eval': [f'the last 5% of {names[0]}']}
  elif len(texts) < eval_every:  # a few files: hold out the last one
    parts = {'train': texts[:-1], 'eval': texts[-1:]}
    held = {'train': names[:-1], 'eval': names[-1:]}
  else:
    is_eval = [i % eval_every == eval_every // 2 for i in range(len(texts))]
    parts = {'train': [t for t, e in zip(texts, is_eval, strict=True) if not e],
             'eval': [t for t, e in zip(texts, is_eval, strict=True) if e]}
    held = {'train': [n for n, e in zip(names, is_eval, strict=True) if not e],
            'eval': [n for n, e in zip(names, is_eval, strict=True) if e]}
  splits = {}
  for name, part in parts.items():
    blocks = [b for t in part for b in _BLOCK_SPLIT.split(t) if b.strip()]
    tokens, lengths = _windows(blocks, seq_len, pack)
    digest = hashlib.sha256()
    for t in part:
      digest.update(len(t).to_bytes(8, 'little') + t)
    splits[name] = Split(tokens, lengths, len(part), sum(map(len, part)),
                         digest.hexdigest()[:16])
  for name, split in splits.items():
    if len(split.lengths) == 0:
      shown = ', '.join(held[name][:5]) + (f' (+{len(held[name]) - 5} more)'
                                           if len(held[name]) > 5 else '')
      raise DataError(
          f'the {name} split of {path or "the default corpus"} is empty: it needs at least one '
          f'paragraph of 2 or more bytes, and its text ({shown}) has none. A single file gives '
          f'its last 5% to eval, several files their last one (a directory of {eval_every} or '
          f'more, every {eval_every}th): put text in those files, or give --data more of it.')
  return splits['train'], splits['eval']


def rows_to_batch(tokens: np.ndarray, lengths: np.ndarray) -> dict:
  """inputs / targets / mask, each [rows, seq_len]; mask marks real target tokens."""
  seq_len = tokens.shape[1] - 1
  mask = np.arange(1, seq_len + 1)[None, :] < lengths[:, None]
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32),
          'mask': mask.astype(np.float32)}


def host_bytes_per_row(seq_len: int) -> int:
  """Host memory one row of a call's batch takes while it is gathered and fed (a lower bound):
  its index in a Python list (~36 B), the gathered uint16 tokens, `rows_to_batch`'s three
  int32/float32 arrays, and the device copy of them (on CPU, host memory as well)."""
  return 36 + 2 * (seq_len + 1) + 2 * 12 * seq_len


class RowIterator:
  """A stream of rows in a seeded random order, reshuffled every epoch.

  The position is two ints (`state()` / `set_state()`): it goes into a checkpoint, and the
  same seed and state give the same rows. Rows are a stream, so K x B and 1 x (K * B) see the
  same rows in the same updates.
  """

  def __init__(self, split: Split, seed: int):
    self.split, self.seed = split, seed
    self.epoch, self.position = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch):
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.split.lengths))

  def state(self) -> dict:
    return {'epoch': self.epoch, 'position': self.position}

  def set_state(self, state: dict):
    self.epoch, self.position = int(state['epoch']), int(state['position'])
    self._order = self._permutation(self.epoch)

  def next_rows(self, n: int, part: tuple[int, int] | None = None) -> dict:
    """The next `n` rows of the stream; with `part=(start, stop)`, only those rows of them
    (one process's share of a global batch: every process advances by all `n`)."""
    index = []
    while len(index) < n:
      take = self._order[self.position:self.position + n - len(index)]
      index.extend(take.tolist())
      self.position += len(take)
      if self.position == len(self._order):
        self.set_state({'epoch': self.epoch + 1, 'position': 0})
    index = np.array(index[slice(*part)] if part else index)
    return rows_to_batch(self.split.tokens[index], self.split.lengths[index])


def eval_batches(split: Split, rows_per_batch: int, num_batches: int) -> list[dict]:
  """A fixed eval set: the first rows of the eval split, in file order."""
  n = min(len(split.lengths), rows_per_batch * num_batches)
  n -= n % rows_per_batch
  if n == 0:
    n = rows_per_batch  # tiny eval split: pad with zero-length rows (zero weight)
  tokens = np.full((n, split.tokens.shape[1]), PAD, np.uint16)
  lengths = np.zeros((n,), np.int32)
  m = min(n, len(split.lengths))
  tokens[:m], lengths[:m] = split.tokens[:m], split.lengths[:m]
  return [rows_to_batch(tokens[s:s + rows_per_batch], lengths[s:s + rows_per_batch])
          for s in range(0, n, rows_per_batch)]
