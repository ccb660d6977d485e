"""Preparation of a text source: read -> clean -> deduplicate -> tokenizer -> tokenize -> token shards + index.

Command line: `python -m llm_jax.data.prepare --config=experiments/tiny.py [--workdir=/tmp/tiny]`; from code:
`llm_jax.data.prepare(config, workdir)` (which dispatches here for the text sources).

Output, in config.data.prepared_dir ('' = <workdir>/data):

  index.json              what was prepared: fingerprint, tokenizer ids, shards per split, statistics, and the
                          unigram baseline (entropy of the validation split under train-split unigram frequencies)
  tokenizer.model         the SentencePiece model the shards are written with
  train-00000.bin ...     token ids, uint16 (uint32 when the vocabulary needs it), little-endian; the documents
  validation-00000.bin    of a split are one stream `doc EOS doc EOS ...`, cut into shards of SHARD_TOKENS

Documents are cleaned (`sources.clean`), dropped when shorter than config.data.min_doc_chars, and exact
duplicates are dropped (train is read first, so validation documents that also occur in train are dropped too:
no contamination). Without config.data.tokenizer_path a tokenizer is trained on the lines of the first
`tokenizer_sample_chars(vocab_size)` characters of cleaned train documents (files are read in hash order, so
that is a sample).

Reuse: the fingerprint covers the source's inputs (file names, sizes, mtimes / TFDS name and version), the data
options that change the tokens, and the tokenizer (its file hash, or its training options). When index.json in
the output has the same fingerprint, nothing is re-read. Atomicity: everything is written to a temporary sibling
directory that is renamed into place only once index.json is in it, so an interrupted run is never taken for a
complete one (its temporary directory is removed, or ignored when the process was killed).

Finally the tokenizer is bound to the workdir (`tokenizer.bind_to_workdir`): a workdir whose model was trained
with another tokenizer is an error, checked before the new output replaces the old one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from typing import Iterator

import numpy as np

from llm_jax.data import sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.errors import UserError

FORMAT_VERSION = 1  # bump when the output layout or the cleaning changes: old outputs are then rebuilt
INDEX_FILE = 'index.json'
TOKENIZER_FILE = 'tokenizer.model'
SHARD_TOKENS = 1 << 27  # tokens per shard file (256 MiB of uint16)
TOKENIZER_SAMPLE_CHARS_MIN = 8_000_000  # characters of cleaned train text the tokenizer is trained on, at least,
TOKENIZER_SAMPLE_CHARS_PER_PIECE = 1_000  # and this many per piece of the vocabulary (32M for a 32k vocabulary)
_ENCODE_BATCH_CHARS = 4_000_000  # characters handed to SentencePiece's threads at once


class PrepareError(UserError, ValueError):
  """Preparation cannot produce a usable corpus; the message names the field, file or split."""


def output_dir(config, workdir: str | None) -> str:
  """config.data.prepared_dir, or <workdir>/data when that is ''."""
  if config.data.prepared_dir:
    return os.path.abspath(os.path.expanduser(config.data.prepared_dir))
  if not workdir:
    raise PrepareError('config.data.prepared_dir: empty and no --workdir given; set one of them')
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'data')


def fingerprint(config) -> str:
  """sha256 of everything the prepared tokens depend on (not seq_len, batch size or seed: those act later)."""
  d = config.data
  if d.tokenizer_path:
    if not os.path.isfile(d.tokenizer_path):
      raise PrepareError(f'config.data.tokenizer_path: {d.tokenizer_path}: file does not exist')
    tokenizer = {'sha256': tokenizer_lib.file_fingerprint(d.tokenizer_path)}
  else:
    tokenizer = {'train_vocab_size': config.model.vocab_size, 'type': d.tokenizer_type,
                 'sample_chars': tokenizer_sample_chars(config.model.vocab_size)}
  description = {
      'format_version': FORMAT_VERSION, 'source': d.source, 'inputs': sources.input_fingerprint(config),
      'min_doc_chars': d.min_doc_chars, 'max_docs': d.max_docs,
      'validation_fraction': d.validation_fraction, 'tokenizer': tokenizer,
  }
  return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def load_index(directory: str) -> dict:
  """The index of a complete preparation; the error says how to make one."""
  path = os.path.join(directory, INDEX_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise PrepareError(f'{path}: not found; run `python -m llm_jax.data.prepare --config=...` '
                       f'(or llm_jax.data.prepare(config, workdir)) first') from None


def read_split_tokens(directory: str, index: dict, role: str) -> list[np.ndarray]:
  """The shards of a split, memory-mapped, in stream order."""
  dtype = np.dtype(index['token_dtype'])
  return [np.memmap(os.path.join(directory, shard['file']), dtype=dtype, mode='r', shape=(shard['num_tokens'],))
          for shard in index['splits'][role]['shards']]


def unigram_entropy(train_shards: list[np.ndarray], validation_shards: list[np.ndarray], vocab_size: int) -> float:
  """Cross-entropy, in nats per token, of the validation tokens under the add-one-smoothed unigram distribution
  of the train tokens: the loss of a model that ignores context. exp() of it is the unigram perplexity."""
  train_counts = np.zeros(vocab_size, np.int64)
  for shard in train_shards:
    train_counts += np.bincount(shard, minlength=vocab_size)
  validation_counts = np.zeros(vocab_size, np.int64)
  for shard in validation_shards:
    validation_counts += np.bincount(shard, minlength=vocab_size)
  log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
  return float(-(validation_counts * log_probs).sum() / validation_counts.sum())


def prepare(config, workdir: str | None = None, progress: bool = True) -> dict:
  """Makes sure the prepared output of `config` exists (building it when its fingerprint differs) and binds its
  tokenizer to `workdir`. Returns the index."""
  directory = output_dir(config, workdir)
  expected = fingerprint(config)
  index = _existing_index(directory)
  if index is None or index.get('fingerprint') != expected:
    index = _build(config, directory, expected, workdir, progress)
  if workdir:
    tokenizer_lib.bind_to_workdir(os.path.join(directory, TOKENIZER_FILE), workdir)
  return index


def _existing_index(directory: str) -> dict | None:
  try:
    return load_index(directory)
  except (PrepareError, json.JSONDecodeError):
    return None


def _build(config, directory: str, expected_fingerprint: str, workdir: str | None, progress: bool) -> dict:
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.tmp-', dir=parent)
  os.chmod(staging, 0o755)  # mkdtemp makes it private; the output is as readable as any other directory
  try:
    index = _write_prepared(config, staging, expected_fingerprint, progress)
    if workdir:  # fail before replacing anything when the workdir belongs to another tokenizer
      tokenizer_lib.check_workdir(workdir, tokenizer_lib.load(os.path.join(staging, TOKENIZER_FILE)))
    _replace_directory(staging, directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return index


def _replace_directory(staging: str, directory: str) -> None:
  """Renames `staging` to `directory`; an old `directory` is moved aside first and removed after."""
  old = None
  if os.path.exists(directory):
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.old-', dir=os.path.dirname(directory))
    os.rename(directory, os.path.join(old, 'data'))
  os.rename(staging, directory)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _clean_documents(config, role: str, seen: set, stats: dict) -> Iterator[str]:
  """Cleaned, long-enough, not-yet-seen documents of `role`; counts what was dropped in `stats`."""
  for doc in sources.read_documents(config, role):
    stats['documents_read'] += 1
    stats['input_chars'] += len(doc.text)
    stats['replaced_bytes'] += doc.replaced
    text = sources.clean(doc.text)
    if len(text) < config.data.min_doc_chars:
      stats['dropped_short'] += 1
      continue
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    if digest in seen:
      stats['dropped_duplicate'] += 1
      continue
    seen.add(digest)
    yield text


def tokenizer_sample_chars(vocab_size: int) -> int:
  """Characters of text a tokenizer of `vocab_size` pieces is trained on: enough to see each piece often."""
  return max(TOKENIZER_SAMPLE_CHARS_MIN, TOKENIZER_SAMPLE_CHARS_PER_PIECE * vocab_size)


def _tokenizer_sample(config) -> Iterator[str]:
  """Non-empty lines of the first `tokenizer_sample_chars` characters of cleaned train documents."""
  total, wanted = 0, tokenizer_sample_chars(config.model.vocab_size)
  for doc in sources.read_documents(config, 'train'):
    text = sources.clean(doc.text)
    if len(text) < config.data.min_doc_chars:
      continue
    for line in text.split('\n'):
      if line.strip():
        yield line
    total += len(text)
    if total >= wanted:
      return


def _obtain_tokenizer(config, staging: str) -> tokenizer_lib.Tokenizer:
  path = os.path.join(staging, TOKENIZER_FILE)
  if config.data.tokenizer_path:
    shutil.copyfile(config.data.tokenizer_path, path)
  else:
    # A list, not a generator: errors of the source then surface as themselves, not from inside SentencePiece.
    sample = list(_tokenizer_sample(config))
    if not sample:
      raise PrepareError(f'{_source_description(config)}: the train split is empty after cleaning (no document '
                         f'of at least config.data.min_doc_chars={config.data.min_doc_chars} characters)')
    model = tokenizer_lib.train(sample, config.model.vocab_size, config.data.tokenizer_type,
                                num_threads=os.cpu_count() or 1)
    with open(path, 'wb') as f:
      f.write(model)
  tokenizer = tokenizer_lib.load(path)
  if tokenizer.eos_id < 0:
    raise tokenizer_lib.TokenizerError(f'config.data.tokenizer_path: {config.data.tokenizer_path} has no EOS '
                                       f'piece; the token stream needs one to separate documents')
  return tokenizer


class _ShardWriter:
  """Appends token arrays to `<role>-NNNNN.bin` files of at most SHARD_TOKENS tokens."""

  def __init__(self, directory: str, role: str, dtype: np.dtype):
    self.directory, self.role, self.dtype = directory, role, dtype
    self.shards: list[dict] = []
    self._file = None

  def write(self, tokens: np.ndarray) -> None:
    while tokens.size:
      if self._file is None or self.shards[-1]['num_tokens'] == SHARD_TOKENS:
        self._open_next()
      room = SHARD_TOKENS - self.shards[-1]['num_tokens']
      head, tokens = tokens[:room], tokens[room:]
      self._file.write(head.astype(self.dtype.newbyteorder('<'), copy=False).tobytes())
      self.shards[-1]['num_tokens'] += int(head.size)

  def _open_next(self) -> None:
    self.close()
    name = f'{self.role}-{len(self.shards):05d}.bin'
    self._file = open(os.path.join(self.directory, name), 'wb')
    self.shards.append({'file': name, 'num_tokens': 0})

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def _tokenize_split(config, role, tokenizer, staging, dtype, seen, progress) -> dict:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  stats = dict(documents_read=0, input_chars=0, replaced_bytes=0, dropped_short=0, dropped_duplicate=0,
               num_documents=0, num_tokens=0)
  writer = _ShardWriter(staging, role, dtype)
  bar = tqdm(desc=f'prepare {role}', unit=' docs', disable=not progress, dynamic_ncols=True)
  threads = os.cpu_count() or 1

  def flush(batch):
    ids = tokenizer.encode_batch(batch, num_threads=threads)
    stream = np.fromiter(itertools.chain.from_iterable(x + [tokenizer.eos_id] for x in ids), dtype)
    writer.write(stream)
    stats['num_documents'] += len(batch)
    stats['num_tokens'] += int(stream.size)
    bar.update(len(batch))
    bar.set_postfix(tokens=f'{stats["num_tokens"]:,}', MB=f'{stats["input_chars"] / 1e6:.1f}')

  try:
    batch, chars = [], 0
    for text in _clean_documents(config, role, seen, stats):
      batch.append(text)
      chars += len(text)
      if chars >= _ENCODE_BATCH_CHARS:
        flush(batch)
        batch, chars = [], 0
    if batch:
      flush(batch)
  finally:
    writer.close()
    bar.close()
  if not stats['num_documents']:
    raise PrepareError(f'{_source_description(config)}: the {role} split is empty after cleaning ({stats["documents_read"]} documents '
                       f'read, {stats["dropped_short"]} shorter than config.data.min_doc_chars='
                       f'{config.data.min_doc_chars}, {stats["dropped_duplicate"]} duplicates)')
  if stats['replaced_bytes']:
    print(f'prepare {role}: {stats["replaced_bytes"]} bytes were not UTF-8 and were replaced by U+FFFD')
  return {'shards': writer.shards, **stats}


def _source_description(config) -> str:
  return {'stdlib': 'the stdlib', 'text_files': f'config.data.paths={config.data.paths!r}',
          'tfds': f'config.data.tfds_name={config.data.tfds_name!r}'}.get(config.data.source, config.data.source)


def _write_prepared(config, staging: str, expected_fingerprint: str, progress: bool) -> dict:
  start = time.time()
  tokenizer = _obtain_tokenizer(config, staging)
  dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
  seen: set[bytes] = set()
  splits = {role: _tokenize_split(config, role, tokenizer, staging, dtype, seen, progress)
            for role in sources.ROLES}
  index = {
      'format_version': FORMAT_VERSION,
      'fingerprint': expected_fingerprint,
      'source': config.data.source,
      'token_dtype': dtype.newbyteorder('<').str,
      'tokenizer': {'file': TOKENIZER_FILE, 'fingerprint': tokenizer.fingerprint, 'vocab_size': tokenizer.vocab_size,
                    'pad_id': tokenizer.pad_id, 'eos_id': tokenizer.eos_id, 'bos_id': tokenizer.bos_id,
                    'unk_id': tokenizer.unk_id},
      'splits': splits,
  }
  index['unigram_entropy'] = unigram_entropy(read_split_tokens(staging, index, 'train'),
                                             read_split_tokens(staging, index, 'validation'), tokenizer.vocab_size)
  index['unigram_perplexity'] = float(np.exp(index['unigram_entropy']))
  index['seconds'] = time.time() - start
  input_chars = sum(split['input_chars'] for split in splits.values())
  index['input_mb_per_s'] = input_chars / 1e6 / max(index['seconds'], 1e-9)
  # index.json last: its presence marks the directory complete.
  with open(os.path.join(staging, INDEX_FILE), 'w') as f:
    json.dump(index, f, indent=1)
  return index


def summary(index: dict) -> str:
  train, validation = index['splits']['train'], index['splits']['validation']
  return (f'{index["source"]}: train {train["num_documents"]:,} docs / {train["num_tokens"]:,} tokens, '
          f'validation {validation["num_documents"]:,} docs / {validation["num_tokens"]:,} tokens, '
          f'vocab {index["tokenizer"]["vocab_size"]}, unigram entropy {index["unigram_entropy"]:.3f} nats '
          f'(perplexity {index["unigram_perplexity"]:.1f}), built in {index["seconds"]:.1f}s '
          f'({index["input_mb_per_s"]:.2f} MB/s of input text)')
