"""Document readers for the text sources, and the cleaning every document goes through.

A source yields `Document`s for one of two roles, 'train' and 'validation':

  stdlib      the running interpreter's standard library `.py` files (sysconfig's 'stdlib' path), without
              site-packages, __pycache__ and the test directories ('test', 'tests', 'idle_test'): about 12 MB
              of real text on every machine, no download. One file = one document.
  text_files  config.data.paths, comma-separated globs. A `.txt`/`.md` file is one document; each line of a
              `.jsonl` file is a record whose config.data.text_field is one document.
  tfds        config.data.tfds_name from config.data.tfds_data_dir (as the user prepared it); the roles read
              config.data.train_split and config.data.eval_split, the text in config.data.tfds_text_key.

stdlib and text_files have no given split: a document is held out for validation when a stable hash of its key
(relative path, or 'path:line' for JSONL records) falls in the first config.data.validation_fraction of the hash
range, so the
split is the same on every machine and does not move when files are added. Files are read in the order of that
hash too, so the first megabytes read are a fair sample of the corpus (the tokenizer trains on them).

Bytes that are not UTF-8 are decoded with errors='replace' (each bad byte becomes U+FFFD) and counted in
`Document.replaced`; preparation reports the total. TensorFlow is imported only by the tfds reader.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import sysconfig
import unicodedata
from typing import Iterator
from llm_jax.errors import UserError

ROLES = ('train', 'validation')
_STDLIB_SKIPPED_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__', 'test', 'tests', 'idle_test'})
_TEXT_SUFFIXES = ('.txt', '.md')
# C0/C1 control characters except tab and newline (carriage returns are turned into newlines first).
_CONTROL_CHARS = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f]')
_LEADING_BLANK_LINES = re.compile(r'\A(?:[ \t]*\n)+')


class SourceError(UserError, ValueError):
  """The configured source cannot be read; the message names the field or file."""


@dataclasses.dataclass(frozen=True)
class Document:
  key: str  # where it comes from: a relative path, 'path:line', or 'split:index'
  text: str  # decoded, not yet cleaned
  replaced: int = 0  # bytes that were not UTF-8 and became U+FFFD


def clean(text: str) -> str:
  """NFC normalisation, newlines as '\\n', control characters other than tab and newline removed, leading blank
  lines and trailing whitespace stripped. Other whitespace is kept: indentation is content in code."""
  if not unicodedata.is_normalized('NFC', text):
    text = unicodedata.normalize('NFC', text)
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  return _LEADING_BLANK_LINES.sub('', _CONTROL_CHARS.sub('', text).rstrip())


def role_of(key: str, validation_fraction: float) -> str:
  """'validation' for a stable `validation_fraction` of keys, else 'train'."""
  return 'validation' if _unit_hash(key) < validation_fraction else 'train'


def _unit_hash(key: str) -> float:
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big') / 2.0**64


def _decode(data: bytes) -> tuple[str, int]:
  try:
    return data.decode('utf-8'), 0
  except UnicodeDecodeError:
    text = data.decode('utf-8', errors='replace')
    return text, text.count('\ufffd') - data.count('\ufffd'.encode())


def _read_file(path: str) -> tuple[str, int]:
  try:
    with open(path, 'rb') as f:
      return _decode(f.read())
  except OSError as e:
    raise SourceError(f'{path}: cannot read it ({e.strerror})') from None


# --- file listings: (key, path) pairs in hash order ------------------------------------------------------------


def stdlib_files() -> list[tuple[str, str]]:
  """(path relative to the stdlib root, absolute path) of every stdlib `.py` file we use, in hash order."""
  root = sysconfig.get_paths()['stdlib']
  found = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIPPED_DIRS]
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        found.append((os.path.relpath(path, root), path))
  return sorted(found, key=lambda item: (_unit_hash(item[0]), item[0]))


def text_files(paths: str) -> list[tuple[str, str]]:
  """(path, path) of every file matched by the comma-separated globs, in hash order; each glob must match."""
  patterns = [p.strip() for p in paths.split(',') if p.strip()]
  if not patterns:
    raise SourceError("config.data.paths: empty; give comma-separated globs of .txt, .md or .jsonl files")
  found = set()
  for pattern in patterns:
    matches = [m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)]
    if not matches:
      what = 'file does not exist' if not glob.has_magic(pattern) else 'glob matches no file'
      raise SourceError(f'config.data.paths: {pattern}: {what}')
    for match in matches:
      if not match.endswith(_TEXT_SUFFIXES + ('.jsonl',)):
        raise SourceError(f'config.data.paths: {match}: unsupported file type; expected .txt, .md or .jsonl')
      found.add(match)
  return sorted(((p, p) for p in found), key=lambda item: (_unit_hash(item[0]), item[0]))


def _listing(config) -> list[tuple[str, str]]:
  return stdlib_files() if config.data.source == 'stdlib' else text_files(config.data.paths)


# --- readers -----------------------------------------------------------------------------------------------------


def _jsonl_documents(path: str, text_field: str) -> Iterator[Document]:
  try:
    f = open(path, 'rb')
  except OSError as e:
    raise SourceError(f'{path}: cannot read it ({e.strerror})') from None
  with f:
    for line_number, raw in enumerate(f, start=1):
      line, replaced = _decode(raw)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise SourceError(f'{path}:{line_number}: not valid JSON ({e.msg})') from None
      if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise SourceError(f'{path}:{line_number}: no string field {text_field!r} '
                          f'(config.data.text_field)')
      yield Document(f'{path}:{line_number}', record[text_field], replaced)


def _file_documents(config, role: str) -> Iterator[Document]:
  fraction = config.data.validation_fraction
  if not 0 < fraction < 1:
    raise SourceError(f'config.data.validation_fraction: must be between 0 and 1, got {fraction}')
  for key, path in _listing(config):
    if path.endswith('.jsonl'):
      for doc in _jsonl_documents(path, config.data.text_field):
        if role_of(doc.key, fraction) == role:
          yield doc
    elif role_of(key, fraction) == role:
      text, replaced = _read_file(path)
      yield Document(key, text, replaced)


def tfds_split_name(config, role: str) -> str:
  return config.data.train_split if role == 'train' else config.data.eval_split


def _tfds_builder(config):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = config.data.tfds_name
  if not name:
    raise SourceError('config.data.tfds_name: empty; name a TFDS dataset, e.g. lm1b')
  try:
    return tfds.builder(name, data_dir=config.data.tfds_data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise SourceError(f'config.data.tfds_name: no TFDS dataset named {name!r}') from None


def _tfds_documents(config, role: str) -> Iterator[Document]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = _tfds_builder(config)
  split = tfds_split_name(config, role)
  try:
    dataset = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError:  # how TFDS says "not downloaded and prepared"
    raise SourceError(f'config.data.tfds_name: dataset {config.data.tfds_name!r} is not prepared in '
                      f'{builder.data_dir}; run tfds.builder({config.data.tfds_name!r}).download_and_prepare() '
                      f'or set config.data.tfds_data_dir') from None
  except ValueError as e:  # unknown split
    raise SourceError(f'config.data.{"train_split" if role == "train" else "eval_split"}: {split!r}: '
                      f'{str(e).splitlines()[0]}') from None
  key = config.data.tfds_text_key
  if key not in dataset.element_spec:
    raise SourceError(f'config.data.tfds_text_key: {key!r} is not a feature of {config.data.tfds_name}; '
                      f'features: {", ".join(dataset.element_spec)}')
  dataset = dataset.map(lambda example: example[key])
  for index, data in enumerate(tfds.as_numpy(dataset)):
    text, replaced = _decode(data)
    yield Document(f'{split}:{index}', text, replaced)


def read_documents(config, role: str) -> Iterator[Document]:
  """The raw documents of `role` ('train' or 'validation'), at most config.data.max_docs of them (0 = all)."""
  if role not in ROLES:
    raise ValueError(f'unknown role {role!r}; expected one of {ROLES}')
  if config.data.source in ('stdlib', 'text_files'):
    documents = _file_documents(config, role)
  elif config.data.source == 'tfds':
    documents = _tfds_documents(config, role)
  else:
    raise SourceError(f'config.data.source: {config.data.source!r} has no document reader in sources.py')
  for count, doc in enumerate(documents):
    if config.data.max_docs and count >= config.data.max_docs:
      return
    yield doc


def input_fingerprint(config) -> dict:
  """What identifies the source's inputs without reading them: file names, sizes and mtimes, or the TFDS
  dataset's name, version and location."""
  if config.data.source == 'tfds':
    builder = _tfds_builder(config)
    return {'tfds_name': config.data.tfds_name, 'version': str(builder.info.version),
            'data_dir': builder.data_dir, 'splits': [tfds_split_name(config, r) for r in ROLES],
            'text_key': config.data.tfds_text_key}
  files = []
  for key, path in _listing(config):
    stat = os.stat(path)
    files.append([key, stat.st_size, stat.st_mtime_ns])
  return {'files': files, 'text_field': config.data.text_field}
