"""Document readers for the text sources, and the cleaning every document goes through.

A source yields `Document`s for one of two roles, 'train' and 'validation':

  stdlib      the running interpreter's standard library `.py` files (sysconfig's 'stdlib' path), without
              site-packages, __pycache__ and the test directories ('test', 'tests', 'idle_test'): about 12 MB
              of real text on every machine, no download. One file = one document.
  text_files  config.data.paths, comma-separated globs. A `.txt`/`.md` file is one document; each line of a
              `.jsonl` file is a record whose config.data.text_field is one document.
  tfds        config.data.tfds_name from config.data.tfds_data_dir (as the user prepared it); the roles read
              config.data.train_split and config.data.eval_split, the text in config.data.tfds_text_key.
  hf_datasets a Hugging Face dataset (hf_source.py).

A `.txt`/`.md` file holds many documents when config.data.document_separator (a regular expression) is set
(keys 'path#n'). config.data.paths entries may be files, globs or folders; files of other types found by a glob
or in a folder, binary files and files that vanish before they are read are skipped and counted.

stdlib and text_files have no given split: a document's role is 'validation' when a stable hash of its key
(relative path, 'path#n', or 'path:line' for JSONL records) falls in the first config.data.validation_fraction
of the hash range, so the split is the same on every machine and does not move when files are added
(preparation.py falls back to the tail of the tokens when that gives too little or too much). Files are read in the order of that
hash too, so the first megabytes read are a fair sample of the corpus (the tokenizer trains on them).

Bytes that are not UTF-8 are decoded with errors='replace' (each bad byte becomes U+FFFD) and counted in
`Document.replaced`; preparation reports the total. TensorFlow is imported only by the tfds reader.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import re
import sysconfig
import unicodedata
from typing import Callable, Iterator
from llm_jax.data import cleaning
from llm_jax.data import hf_source
from llm_jax.data.documents import Document, SourceError, Task  # noqa: F401 (sources.Document etc. for callers)

ROLES = ('train', 'validation')
_STDLIB_SKIPPED_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__', 'test', 'tests', 'idle_test'})
_TEXT_SUFFIXES = ('.txt', '.md')
# C0/C1 control characters except tab and newline (carriage returns are turned into newlines first).
_CONTROL_CHARS = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f]')
_LEADING_BLANK_LINES = re.compile(r'\A(?:[ \t]*\n)+')


def clean(text: str) -> str:
  """NFC normalisation, newlines as '\\n', terminal escape sequences removed whole (`ESC[32m`; see
  cleaning.remove_escape_sequences), other control characters than tab and newline removed, leading blank lines
  and trailing whitespace stripped. Other whitespace is kept: indentation is content in code."""
  return clean_counted(text)[0]


def clean_counted(text: str) -> tuple[str, int]:
  """`clean(text)`, and the number of terminal escape sequences it removed."""
  text, escapes = cleaning.remove_escape_sequences(text)
  if not unicodedata.is_normalized('NFC', text):
    text = unicodedata.normalize('NFC', text)
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  return _LEADING_BLANK_LINES.sub('', _CONTROL_CHARS.sub('', text).rstrip()), escapes


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


# --- file listings: (key, path) pairs in hash order ------------------------------------------------------------


def stdlib_line_windows(size: int):
  """(file key, index of the first line, `size` lines) for each disjoint window of `size` non-blank lines of each
  stdlib file, in stdlib_files order: what the stdlib instruction and preference sources are made of."""
  for key, path in stdlib_files():
    data = read_bytes(path)
    if data is None:
      continue
    lines = [line for line in data.decode('utf-8', 'replace').splitlines() if line.strip()]
    for start in range(0, len(lines) - size + 1, size):
      yield key, start, lines[start:start + size]


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


def _supported(path: str) -> bool:
  return path.endswith(_TEXT_SUFFIXES + ('.jsonl',))


def text_files(paths: str, skipped: collections.Counter | None = None) -> list[tuple[str, str]]:
  """(path, path) of every file matched by the comma-separated globs, files or folders, in hash order.

  Each entry must match something. A file named explicitly must have a supported type; files of other types
  found by a glob or inside a folder are skipped and counted in `skipped['unsupported_type']`.
  """
  patterns = [p.strip() for p in paths.split(',') if p.strip()]
  if not patterns:
    raise SourceError("config.data.paths: empty; give comma-separated globs, files or folders of .txt, .md or "
                      ".jsonl files")
  found = set()
  for pattern in patterns:
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
      matches = [os.path.join(d, n) for d, _, names in os.walk(expanded) for n in names]
      explicit = False
    else:
      matches = [m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m)]
      explicit = not glob.has_magic(pattern)
    if not matches:
      what = 'file does not exist' if explicit else 'glob matches no file'
      raise SourceError(f'config.data.paths: {pattern}: {what}')
    supported = [m for m in matches if _supported(m)]
    if explicit and not supported:
      raise SourceError(f'config.data.paths: {matches[0]}: unsupported file type; expected .txt, .md or .jsonl')
    if not supported:
      raise SourceError(f'config.data.paths: {pattern}: no .txt, .md or .jsonl file among its '
                        f'{len(matches)} files')
    if skipped is not None:
      skipped['unsupported_type'] += len(matches) - len(supported)
    found.update(supported)
  return sorted(((p, p) for p in found), key=lambda item: (_unit_hash(item[0]), item[0]))


def file_listing(config, skipped: collections.Counter | None = None) -> list[tuple[str, str]]:
  return stdlib_files() if config.data.source == 'stdlib' else text_files(config.data.paths, skipped)


# --- readers -----------------------------------------------------------------------------------------------------


def read_bytes(path: str) -> bytes | None:
  """The file's bytes; None when it vanished or cannot be read (the caller counts it as skipped).

  The one place file sources read input files (an object-store layer can take over here)."""
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError:
    return None


def _looks_binary(data: bytes, replaced: int) -> bool:
  """NUL bytes, or more than 30% of the bytes not UTF-8: an image, archive or other non-text file (text in a
  legacy encoding such as Latin-1 has far fewer)."""
  return b"\x00" in data[:8192] or replaced > 0.3 * len(data)


def _jsonl_documents(path: str, data: bytes, text_field: str) -> Iterator[Document]:
  for line_number, raw in enumerate(data.splitlines(), start=1):
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


def separator_pattern(config) -> re.Pattern | None:
  """config.data.document_separator compiled (multiline: '^%$' is a line holding only '%'); None when ''."""
  if not config.data.document_separator:
    return None
  try:
    return re.compile(config.data.document_separator, re.MULTILINE)
  except re.error as e:
    raise SourceError(f'config.data.document_separator: {config.data.document_separator!r} is not a regular '
                      f'expression ({e})') from None


def _text_documents(key: str, text: str, replaced: int, separator: re.Pattern | None) -> Iterator[Document]:
  """The documents of a .txt/.md file: the whole file, or its parts between separators ('key#n', blank parts
  skipped). Replaced bytes are counted on the first document."""
  if separator is None:
    yield Document(key, text, replaced)
    return
  for number, part in enumerate(separator.split(text)):
    if part.strip():
      yield Document(f'{key}#{number}', part, replaced)
      replaced = 0


def file_documents(config, files: list[tuple[str, str]], skipped: collections.Counter) -> Iterator[Document]:
  """The documents of `files` in order; unreadable (vanished) and binary files are skipped and counted."""
  separator = separator_pattern(config)
  for key, path in files:
    data = read_bytes(path)
    if data is None:
      skipped['unreadable'] += 1
      print(f'prepare: skipped {path}: it cannot be read (vanished or no permission)')
      continue
    if path.endswith('.jsonl'):
      yield from _jsonl_documents(path, data, config.data.text_field)
      continue
    text, replaced = _decode(data)
    if _looks_binary(data, replaced):
      skipped['binary'] += 1
      print(f'prepare: skipped {path}: binary, not text')
      continue
    yield from _text_documents(key, text, replaced, separator)


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


TASK_BYTES = 1 << 20  # input bytes per preparation task of a file source (tasks are the unit of parallelism)


def _file_tasks(config, skipped: collections.Counter | None) -> list[Task]:
  """Files grouped to about TASK_BYTES each, in the listing's order (a single task when max_docs is set)."""
  files = file_listing(config, skipped)
  if config.data.max_docs:
    return [Task('files', files=tuple(files))]  # stops once max_docs of each role are read
  tasks, group, size = [], [], 0
  for key, path in files:
    group.append((key, path))
    try:
      size += os.path.getsize(path)
    except OSError:
      pass  # vanished: the task reading it counts it
    if size >= TASK_BYTES:
      tasks.append(Task('files', files=tuple(group), size=size))
      group, size = [], 0
  if group:
    tasks.append(Task('files', files=tuple(group), size=size))
  return tasks


def _file_fingerprint(config) -> dict:
  files = []
  for key, path in file_listing(config):
    try:
      stat = os.stat(path)
    except OSError:
      continue  # vanished since the listing: preparation skips it too
    files.append([key, stat.st_size, stat.st_mtime_ns])
  return {'files': files, 'text_field': config.data.text_field,
          'document_separator': config.data.document_separator}


def _tfds_fingerprint(config) -> dict:
  builder = _tfds_builder(config)
  return {'tfds_name': config.data.tfds_name, 'version': str(builder.info.version),
          'data_dir': builder.data_dir, 'splits': [tfds_split_name(config, r) for r in ROLES],
          'text_key': config.data.tfds_text_key}


@dataclasses.dataclass(frozen=True)
class Reader:
  """How one text source is read: cut into tasks, fingerprinted without reading, and named in messages."""
  tasks: Callable  # (config, skipped counter or None) -> [Task] in stream order
  fingerprint: Callable  # config -> what identifies the inputs (names, sizes, versions), JSON-able
  describe: Callable  # config -> the source as an error message names it
  given_splits: Callable = lambda config: False  # config -> the source defines its validation split itself


_FILES = dict(tasks=_file_tasks, fingerprint=_file_fingerprint)
# config.data.source -> its reader: the text sources that preparation.py cleans, tokenizes and holds out from.
READERS = {
    'stdlib': Reader(**_FILES, describe=lambda config: 'the stdlib'),
    'text_files': Reader(**_FILES, describe=lambda config: f'config.data.paths={config.data.paths!r}'),
    # one task reads both splits: TFDS reads in parallel itself
    'tfds': Reader(tasks=lambda config, skipped: [Task('tfds')], fingerprint=_tfds_fingerprint,
                   describe=lambda config: f'config.data.tfds_name={config.data.tfds_name!r}',
                   given_splits=lambda config: True),
    'hf_datasets': Reader(tasks=lambda config, skipped: hf_source.tasks(config),
                          fingerprint=hf_source.input_fingerprint,
                          describe=lambda config: f'config.data.hf_path={config.data.hf_path!r}',
                          given_splits=hf_source.has_given_splits),
}


def reader(config) -> Reader:
  source = config.data.source
  if source not in READERS:
    raise SourceError(f'config.data.source: {source!r} has no document reader in sources.py')
  return READERS[source]


def has_given_splits(config) -> bool:
  """Whether the source defines its validation split itself (TFDS, a dataset with both splits)."""
  return reader(config).given_splits(config)


def document_tasks(config, skipped: collections.Counter | None = None) -> list[Task]:
  """The source cut into tasks, in stream order: files grouped to about TASK_BYTES each (a single task when
  config.data.max_docs is set), one task for TFDS, row ranges of a Hugging Face dataset's splits."""
  return reader(config).tasks(config, skipped)


def task_documents(config, task: Task, skipped: collections.Counter) -> Iterator[Document]:
  """The raw documents of one task, each with its role ('train' or 'validation')."""
  if task.kind == 'tfds':
    for role in ROLES:
      for doc in _tfds_documents(config, role):
        yield dataclasses.replace(doc, role=role)
    return
  if task.kind == 'hf':
    documents = hf_source.documents(config, task)
  else:
    documents = file_documents(config, list(task.files), skipped)
  fraction = config.data.validation_fraction
  for doc in documents:
    yield dataclasses.replace(doc, role=task.role or role_of(doc.key, fraction))


def read_documents(config, role: str | None = None) -> Iterator[Document]:
  """The raw documents of the source in stream order (of `role` only, when given), at most config.data.max_docs
  of each role (0 = all)."""
  if role is not None and role not in ROLES:
    raise ValueError(f'unknown role {role!r}; expected one of {ROLES}')
  counts = collections.Counter()
  skipped = collections.Counter()
  for task in document_tasks(config):
    for doc in task_documents(config, task, skipped):
      if role is not None and doc.role != role:
        continue
      if config.data.max_docs and counts[doc.role] >= config.data.max_docs:
        continue
      counts[doc.role] += 1
      yield doc


def input_fingerprint(config) -> dict:
  """What identifies the source's inputs without reading them: file names, sizes and mtimes, the TFDS
  dataset's name, version and location, or the Hugging Face dataset's fingerprints."""
  return reader(config).fingerprint(config)
