"""Preparation of a text source: tokenizer -> tasks (read, clean, filter, tokenize) -> deduplicate -> validation
hold-out -> token shards + index.

Command line: `python -m llm_jax.data.prepare --config=experiments/tiny.py [--workdir=/tmp/tiny]`; from code:
`llm_jax.data.prepare(config, workdir)` (which dispatches here for the text sources).

Output, in config.data.prepared_dir ('' = <workdir>/data):

  index.json              what was prepared: fingerprint, tokenizer ids and (trained SentencePiece) the character
                          coverage it was trained with, shards per split, statistics (escape sequences removed,
                          characters spelled as bytes, drops), and the unigram baseline (entropy of the validation
                          split under train-split unigram frequencies)
  tokenizer.model         the tokenizer the shards are written with (SentencePiece; or tokenizer.json with its
                          tokenizer_config.json: see llm_jax.data.tokenizer)
  train-00000.bin ...     token ids, uint16 (uint32 when the vocabulary needs it), little-endian; the documents
  validation-00000.bin    of a split are one stream `doc EOS doc EOS ...`, cut into shards of SHARD_TOKENS

Steps. (1) Without config.data.tokenizer_path a tokenizer is trained on the lines of the first
`tokenizer_sample_chars(vocab_size)` characters of cleaned, kept train documents (files are read in hash order,
so that is a sample). (2) The source is cut into tasks (`sources.document_tasks`, independent of the number of
workers) that run in parallel (`preparation_tasks`, config.data.prepare_workers): each reads its documents,
cleans them (`sources.clean`), drops those shorter than config.data.min_doc_chars or rejected by a quality filter
(`cleaning`, config.data.filters), and tokenizes the rest. (3) Over all tasks, in a fixed order (train documents
first, then validation), exact duplicates and, with config.data.near_dedup, MinHash near-duplicates are dropped:
a validation document with a twin in train is dropped, so there is no contamination. (4) The validation split is
the documents whose key hashes into validation, or, when that gives none or a share far from
config.data.validation_fraction, the tail share of the token stream (`_hold_out_tail`). (5) The shards are
written. The output is the same byte for byte whatever the number of workers.

Reuse: the fingerprint covers the source's inputs (file names, sizes, mtimes / TFDS name and version / Hugging Face
fingerprints), the data
options that change the tokens, and the tokenizer (its file hash, or its training options). When index.json in
the output has the same fingerprint, nothing is re-read. Atomicity: everything is written to a temporary sibling
directory that is renamed into place only once index.json is in it, so an interrupted run is never taken for a
complete one (its temporary directory is removed, or ignored when the process was killed).

Finally the tokenizer is bound to the workdir (`tokenizer.bind_to_workdir`): a workdir whose model was trained
with another tokenizer is an error, checked before the new output replaces the old one.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from llm_jax import storage
from llm_jax.data import cleaning
from llm_jax.data import preparation_tasks
from llm_jax.data import sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.errors import UserError

FORMAT_VERSION = 3  # bump when the output layout or the cleaning changes: old outputs are then rebuilt
INDEX_FILE = 'index.json'
TOKENIZER_FILE = 'tokenizer.model'  # the SentencePiece name; index.json's tokenizer.file names the one written
SHARD_TOKENS = 1 << 27  # tokens per shard file (256 MiB of uint16)
TOKENIZER_SAMPLE_CHARS_MIN = 8_000_000  # characters of cleaned train text the tokenizer is trained on, at least,
TOKENIZER_SAMPLE_CHARS_PER_PIECE = 1_000  # and this many per piece of the vocabulary (32M for a 32k vocabulary)
TOKENIZER_SAMPLE_SENTENCE_CHARS = 2_000  # the sample is given to the trainer as runs of lines up to this long


class PrepareError(UserError, ValueError):
  """Preparation cannot produce a usable corpus; the message names the field, file or split."""


def output_dir(config, workdir: str | None) -> str:
  """config.data.prepared_dir, or <workdir>/data when that is ''; either may be a gs:// or s3:// URL."""
  if config.data.prepared_dir:
    return storage.absolute(config.data.prepared_dir)
  if not workdir:
    raise PrepareError('config.data.prepared_dir: empty and no --workdir given; set one of them')
  return storage.join(storage.absolute(workdir), 'data')


def fingerprint(config) -> str:
  """sha256 of everything the prepared tokens depend on (not seq_len, batch size or seed: those act later)."""
  d = config.data
  if d.tokenizer_path:
    if not tokenizer_lib.tokenizer_file(d.tokenizer_path):
      raise PrepareError(f'config.data.tokenizer_path: {d.tokenizer_path}: no such tokenizer file')
    given = tokenizer_lib.load(d.tokenizer_path, d.add_bos)
    tokenizer = {'sha256': given.fingerprint}
    starts_with_bos = given.add_bos
  else:
    tokenizer = {'train_vocab_size': config.model.vocab_size, 'type': d.tokenizer_type,
                 'sample_chars': tokenizer_sample_chars(config.model.vocab_size)}
    if d.tokenizer_type in tokenizer_lib.SENTENCEPIECE_TYPES:
      tokenizer['character_coverage'] = d.tokenizer_character_coverage
    starts_with_bos = d.add_bos == 'always'  # a trained tokenizer adds no BOS of its own
  if starts_with_bos:  # only then: the fingerprints of data prepared before the setting existed stay the same
    tokenizer['documents_start_with_bos'] = True
  description = {
      'format_version': FORMAT_VERSION, 'source': d.source, 'inputs': sources.input_fingerprint(config),
      'min_doc_chars': d.min_doc_chars, 'max_docs': d.max_docs,
      'validation_fraction': d.validation_fraction, 'tokenizer': tokenizer,
      'filters': list(cleaning.filter_names(config)),
      'near_dedup': d.near_dedup and d.near_dedup_threshold,
  }
  return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def load_index(directory: str) -> dict:
  """The index of a complete preparation; the error says how to make one."""
  path = storage.join(directory, INDEX_FILE)
  try:
    return json.loads(storage.read_text(path))
  except FileNotFoundError:
    raise PrepareError(f'{path}: not found; run `python -m llm_jax.data.prepare --config=...` '
                       f'(or llm_jax.data.prepare(config, workdir)) first') from None


def read_split_tokens(directory: str, index: dict, role: str) -> list:
  """The shards of a split, in stream order: memory-mapped arrays locally, `RangedShard`s in a bucket."""
  dtype = np.dtype(index['token_dtype'])
  if storage.is_url(directory):
    return [RangedShard(storage.join(directory, shard['file']), dtype, shard['num_tokens'])
            for shard in index['splits'][role]['shards']]
  return [np.memmap(os.path.join(directory, shard['file']), dtype=dtype, mode='r', shape=(shard['num_tokens'],))
          for shard in index['splits'][role]['shards']]


class RangedShard:
  """A token shard in a bucket, never downloaded whole: `shard[a:b]` is one ranged request for those tokens, and
  `pipeline.TokenStream.read_rows` fetches a batch's windows with concurrent ranged requests
  (storage.read_ranges), so memory holds one batch, not a shard."""

  def __init__(self, path: str, dtype: np.dtype, num_tokens: int):
    self.path, self.dtype, self.size = path, np.dtype(dtype), int(num_tokens)

  def byte_range(self, start: int, stop: int) -> tuple[int, int]:
    return start * self.dtype.itemsize, stop * self.dtype.itemsize

  def __getitem__(self, index: slice) -> np.ndarray:
    start, stop, _ = index.indices(self.size)
    first, end = self.byte_range(start, max(start, stop))
    return np.frombuffer(storage.read_range(self.path, first, end - first), self.dtype)


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


def prepare(config, workdir: str | None = None, progress: bool = True, executor=None) -> dict:
  """Makes sure the prepared output of `config` exists (building it when its fingerprint differs) and binds its
  tokenizer to `workdir`. Returns the index. `executor`: run the tasks on it instead of locally (see
  `preparation_tasks.run_all`; e.g. `preparation_tasks.datatrove_executor('slurm', {...}, logs)`)."""
  directory = output_dir(config, workdir)
  expected = fingerprint(config)
  index = _existing_index(directory)
  if index is None or index.get('fingerprint') != expected:
    index = _build(config, directory, expected, workdir, progress, executor)
  if workdir:
    tokenizer_lib.bind_to_workdir(tokenizer_lib.tokenizer_file(directory), workdir)
  return index


def _existing_index(directory: str) -> dict | None:
  try:
    return load_index(directory)
  except (PrepareError, json.JSONDecodeError):
    return None


def _build(config, directory: str, expected_fingerprint: str, workdir: str | None, progress: bool,
           executor=None) -> dict:
  if storage.is_url(directory):
    return _build_in_bucket(config, directory, expected_fingerprint, workdir, progress, executor)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.tmp-', dir=parent)
  os.chmod(staging, 0o755)  # mkdtemp makes it private; the output is as readable as any other directory
  try:
    index = _write_prepared(config, staging, expected_fingerprint, progress, executor)
    if workdir:  # fail before replacing anything when the workdir belongs to another tokenizer
      tokenizer_lib.check_workdir(workdir, tokenizer_lib.load(staging))
    _replace_directory(staging, directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return index


def _build_in_bucket(config, directory: str, expected_fingerprint: str, workdir: str | None, progress: bool,
                     executor=None) -> dict:
  """Prepares into a local temporary directory, then uploads it to `directory` (a URL) with index.json last.

  A bucket has no rename: the old index.json is deleted first (the output is then incomplete to every reader),
  the old objects are removed, the new shards and tokenizer are uploaded, and index.json, whose presence marks
  the output complete, is uploaded last. A cluster executor's workers cannot see a local staging directory.
  """
  if executor is not None:
    raise PrepareError(f'{directory}: a cluster executor needs its output on a shared file system; prepare there '
                       f'and copy the directory to the bucket, or prepare in the bucket without --executor')
  staging = tempfile.mkdtemp(prefix='llm_jax-prepare-')
  try:
    index = _write_prepared(config, staging, expected_fingerprint, progress, None)
    if workdir:  # fail before replacing anything when the workdir belongs to another tokenizer
      tokenizer_lib.check_workdir(workdir, tokenizer_lib.load(staging))
    if storage.exists(storage.join(directory, INDEX_FILE)):
      storage.remove(storage.join(directory, INDEX_FILE))
    storage.rmtree(directory)
    for name in sorted(os.listdir(staging)):
      if name != INDEX_FILE and os.path.isfile(os.path.join(staging, name)):
        storage.copy(os.path.join(staging, name), storage.join(directory, name))
    storage.copy(os.path.join(staging, INDEX_FILE), storage.join(directory, INDEX_FILE))
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


def tokenizer_sample_chars(vocab_size: int) -> int:
  """Characters of text a tokenizer of `vocab_size` pieces is trained on: enough to see each piece often."""
  return max(TOKENIZER_SAMPLE_CHARS_MIN, TOKENIZER_SAMPLE_CHARS_PER_PIECE * vocab_size)


def _tokenizer_sample(config) -> list[str]:
  """The first `tokenizer_sample_chars` characters of cleaned, kept train documents (of any role when no train
  document exists: a single file whose key hashes into validation is held out by tokens), as runs of whole lines
  of at most TOKENIZER_SAMPLE_SENTENCE_CHARS characters with their newlines kept: the tokenizer then learns
  pieces for a newline and what goes with it (`):\n`, a newline and the next line's indentation), where a sample of
  single lines would leave every newline spelled as a byte."""
  wanted = tokenizer_sample_chars(config.model.vocab_size)
  filters = cleaning.Filters(cleaning.filter_names(config))
  sentences = {role: [] for role in sources.ROLES}
  total = dict.fromkeys(sources.ROLES, 0)
  for doc in sources.read_documents(config):
    if total[doc.role] >= wanted:
      continue
    text = sources.clean(doc.text)
    if len(text) < config.data.min_doc_chars or filters.rejection(text):
      continue
    sentences[doc.role].extend(_line_runs(text, TOKENIZER_SAMPLE_SENTENCE_CHARS))
    total[doc.role] += len(text)
    if total['train'] >= wanted:
      break
  return sentences['train'] or sentences['validation']


def _line_runs(text: str, limit: int) -> list[str]:
  """`text` cut after newlines into runs of at most `limit` characters (a longer line is a run of its own)."""
  runs, current = [], ''
  lines = text.split('\n')
  for line in [line + '\n' for line in lines[:-1]] + lines[-1:]:
    if current and len(current) + len(line) > limit:
      runs.append(current)
      current = ''
    current += line
  if current.strip():
    runs.append(current)
  return [run for run in runs if run.strip()]


def _obtain_tokenizer(config, staging: str) -> tuple[tokenizer_lib.Tokenizer, dict]:
  """The given tokenizer (its files copied into `staging`), or one trained there (tokenizer.model or
  tokenizer.json, by config.data.tokenizer_type); and, for a trained SentencePiece one, how its characters were
  chosen (index.json's tokenizer.character_coverage and the fields beside it; else {})."""
  training = {}
  if config.data.tokenizer_path:
    tokenizer_lib.copy_files(tokenizer_lib.load(config.data.tokenizer_path), staging)
  else:
    # A list, not a generator: errors of the source then surface as themselves, not from inside SentencePiece.
    sample = _tokenizer_sample(config)
    if not sample:
      raise PrepareError(f'{_source_description(config)}: the train split is empty after cleaning (no document '
                         f'of at least config.data.min_doc_chars={config.data.min_doc_chars} characters)')
    trained = tokenizer_lib.train_detailed(sample, config.model.vocab_size, config.data.tokenizer_type,
                                           num_threads=os.cpu_count() or 1,
                                           character_coverage=config.data.tokenizer_character_coverage)
    with open(os.path.join(staging, tokenizer_lib.trained_file_name(config.data.tokenizer_type)), 'wb') as f:
      f.write(trained.model)
    if trained.character_coverage is not None:
      training = {'character_coverage': trained.character_coverage,
                  'character_coverage_setting': trained.coverage_setting,
                  'sample_characters': trained.sample_characters, 'character_pieces': trained.character_pieces,
                  'sample_byte_share': trained.sample_byte_share,
                  'pieces_for_default_coverage': trained.pieces_for_default}
  tokenizer = tokenizer_lib.load(staging, config.data.add_bos)
  if tokenizer.eos_id < 0:
    raise tokenizer_lib.TokenizerError(f'config.data.tokenizer_path: {config.data.tokenizer_path} has no EOS '
                                       f'piece; the token stream needs one to separate documents')
  return tokenizer, training


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


def _source_description(config) -> str:
  return sources.reader(config).describe(config)


AUTO_PARALLEL_BYTES = 64 << 20  # prepare_workers=0 runs tasks in one process below this much input


def _workers(config, tasks: list[sources.Task]) -> int:
  """config.data.prepare_workers, or for 0 the machine's cores, except for small inputs (under
  AUTO_PARALLEL_BYTES): starting a process pool then costs more than it saves (SentencePiece encodes on all cores
  in one process anyway)."""
  if config.data.prepare_workers:
    return config.data.prepare_workers
  if sum(task.size for task in tasks) < AUTO_PARALLEL_BYTES:
    return 1
  return os.cpu_count() or 1


def _write_prepared(config, staging: str, expected_fingerprint: str, progress: bool, executor=None) -> dict:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  start = time.time()
  skipped = collections.Counter()
  tasks = sources.document_tasks(config, skipped)
  tokenizer, training = _obtain_tokenizer(config, staging)
  dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
  work = os.path.join(staging, '.tasks')
  os.makedirs(work)
  bar = tqdm(desc='prepare', unit=' docs', disable=not progress, dynamic_ncols=True)
  try:
    preparation_tasks.run_all(config, tasks, os.path.join(staging, tokenizer.file_name), work,
                              _workers(config, tasks), bar, executor)
  finally:
    bar.close()
  results = [preparation_tasks.TaskResult(work, i) for i in range(len(tasks))]
  for result in results:
    skipped.update(result.skipped)
  keep, splits = _deduplicate(config, results)
  holdout = _write_splits(config, results, keep, splits, staging, dtype, tokenizer.eos_id)
  shutil.rmtree(work)
  for role in sources.ROLES:
    if not splits[role]['num_documents']:
      raise PrepareError(f'{_source_description(config)}: the {role} split is empty after cleaning '
                         f'({_drops(splits[role])})')
  index = {
      'format_version': FORMAT_VERSION,
      'fingerprint': expected_fingerprint,
      'source': config.data.source,
      'token_dtype': dtype.newbyteorder('<').str,
      'tokenizer': {'file': tokenizer.file_name, 'fingerprint': tokenizer.fingerprint, 'vocab_size': tokenizer.vocab_size,
                    'pad_id': tokenizer.pad_id, 'eos_id': tokenizer.eos_id, 'bos_id': tokenizer.bos_id,
                    'unk_id': tokenizer.unk_id, 'documents_start_with_bos': tokenizer.add_bos, **training},
      'filters': list(cleaning.filter_names(config)),
      'near_dedup': bool(config.data.near_dedup),
      'validation_holdout': holdout,
      'skipped_files': {k: v for k, v in sorted(skipped.items()) if v},
      'splits': splits,
  }
  index['unigram_entropy'] = unigram_entropy(read_split_tokens(staging, index, 'train'),
                                             read_split_tokens(staging, index, 'validation'), tokenizer.vocab_size)
  index['unigram_perplexity'] = float(np.exp(index['unigram_entropy']))
  index['seconds'] = time.time() - start
  input_chars = sum(split['input_chars'] for split in splits.values())
  index['input_mb_per_s'] = input_chars / 1e6 / max(index['seconds'], 1e-9)
  index['workers'] = min(_workers(config, tasks), len(tasks)) if executor is None else None
  print(report(index))
  # index.json last: its presence marks the directory complete.
  with open(os.path.join(staging, INDEX_FILE), 'w') as f:
    json.dump(index, f, indent=1)
  return index


def _drops(split: dict) -> str:
  drops = ', '.join(f'{key[len("dropped_"):]} {value}' for key, value in split.items()
                    if key.startswith('dropped_') and value)
  return f'{split["documents_read"]} documents read, dropped: {drops or "none"}'


def report(index: dict) -> str:
  """What preparation did to each split, in lines: documents read, kept, dropped per rule; skipped files."""
  lines = []
  for role, split in index['splits'].items():
    lines.append(f'prepare {role}: {_drops(split)}; kept {split["num_documents"]:,} documents, '
                 f'{split["num_tokens"]:,} tokens')
    if split['replaced_bytes']:
      lines.append(f'prepare {role}: {split["replaced_bytes"]} bytes were not UTF-8 and were replaced by U+FFFD')
    if split.get('escape_sequences'):
      lines.append(f'prepare {role}: removed {split["escape_sequences"]:,} terminal escape sequences (colours, '
                   f'cursor moves) from the text')
  characters = _character_report(index)
  if characters:
    lines.append(characters)
  lines.append(f'prepare: validation held out {index["validation_holdout"]["description"]}')
  if index['skipped_files']:
    lines.append('prepare: skipped files: ' + ', '.join(f'{k} {v}' for k, v in index['skipped_files'].items()))
  return '\n'.join(lines)


def _character_report(index: dict) -> str:
  """The tokenizer's character coverage and the share of the cleaned text's characters spelled as bytes."""
  tokenizer, splits = index['tokenizer'], index['splits'].values()
  parts = []
  if tokenizer.get('character_coverage') is not None:
    setting = tokenizer['character_coverage_setting']
    how = 'auto' if setting == 'auto' else f'config.data.tokenizer_character_coverage={setting}'
    if tokenizer['pieces_for_default_coverage'] > tokenizer['vocab_size'] and setting == 'auto':
      how += (f', lowered from {tokenizer_lib.DEFAULT_COVERAGE}, which needs vocab_size '
              f'{tokenizer["pieces_for_default_coverage"]:,}')
    parts.append(f'tokenizer character coverage {tokenizer["character_coverage"]:.4f} ({how}): '
                 f'{tokenizer["character_pieces"]:,} of the sample\'s {tokenizer["sample_characters"]:,} distinct '
                 f'characters have pieces')
  chars = sum(split.get('tokenized_chars', 0) for split in splits)
  as_bytes = sum(split.get('byte_fallback_chars', 0) for split in splits)
  if chars and tokenizer['file'] == tokenizer_lib.SENTENCEPIECE_FILE:  # byte-level BPE: all bytes, always
    parts.append(f'{100 * as_bytes / chars:.2f}% of the text\'s characters ({as_bytes:,} of {chars:,}) are '
                 f'spelled as UTF-8 bytes')
  return 'prepare: ' + '; '.join(parts) if parts else ''


def _deduplicate(config, results) -> tuple[list[np.ndarray], dict]:
  """Which surviving documents of each task to keep, and the per-split counts so far. Priority order: train
  documents first, then validation (a validation document with a twin in train is dropped), each in stream
  order; exact duplicates by digest, then near-duplicates by MinHash among the rest."""
  filter_names = cleaning.filter_names(config)
  splits = preparation_tasks.empty_stats(filter_names)
  for result in results:
    for role in sources.ROLES:
      for key, value in result.stats[role].items():
        splits[role][key] += value
  for role in sources.ROLES:
    splits[role].update(dropped_duplicate=0, dropped_near_duplicate=0)
  keep = [np.ones(r.lengths.size, bool) for r in results]
  order = [(role, t, i) for role in (0, 1) for t, r in enumerate(results) for i in np.flatnonzero(r.roles == role)]
  seen = set()
  for role, t, i in order:
    digest = results[t].digests[i].tobytes()
    if digest in seen:
      keep[t][i] = False
      splits[sources.ROLES[role]]['dropped_duplicate'] += 1
    seen.add(digest)
  if config.data.near_dedup:
    survivors = [(role, t, i) for role, t, i in order if keep[t][i]]
    signatures = []
    for _, t, i in survivors:
      signature = results[t].signatures[i]
      signatures.append(signature if signature.any() else None)
    bands = cleaning.MinHasher().bands
    for (role, t, i), dropped in zip(survivors, cleaning.near_duplicates(signatures, bands,
                                                                         config.data.near_dedup_threshold)):
      if dropped:
        keep[t][i] = False
        splits[sources.ROLES[role]]['dropped_near_duplicate'] += 1
  return keep, splits


def _with_eos(result, selected: np.ndarray, eos_id: int) -> np.ndarray:
  """The selected documents of a task as one stream, each followed by EOS."""
  if not selected.any():
    return np.zeros(0, np.uint32)
  lengths, starts = result.lengths[selected], result.starts[selected]
  out_starts = np.cumsum(lengths + 1) - (lengths + 1)  # where each document begins in the output
  within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # index in its doc
  out = np.full(int((lengths + 1).sum()), eos_id, np.uint32)
  out[np.repeat(out_starts, lengths) + within] = result.tokens()[np.repeat(starts, lengths) + within]
  return out


def _write_splits(config, results, keep, splits, staging, dtype, eos_id) -> dict:
  """Writes the shards of both splits; returns how validation was held out."""
  writers = {role: _ShardWriter(staging, role, dtype) for role in sources.ROLES}
  fraction = config.data.validation_fraction
  given = sources.has_given_splits(config)
  try:
    by_role = {role: sum(int((r.lengths[k & (r.roles == rid)] + 1).sum()) for r, k in zip(results, keep))
               for rid, role in enumerate(sources.ROLES)}
    documents = {role: sum(int((k & (r.roles == rid)).sum()) for r, k in zip(results, keep))
                 for rid, role in enumerate(sources.ROLES)}
    total = sum(by_role.values())
    share = by_role['validation'] / max(total, 1)
    # By documents when that gives a share near the wanted one; a few files (or one) give none, or far too
    # much: then by tokens.
    if given or (documents['train'] and documents['validation'] and fraction / 4 <= share <= 3 * fraction):
      for rid, role in enumerate(sources.ROLES):
        for result, kept in zip(results, keep):
          writers[role].write(_with_eos(result, kept & (result.roles == rid), eos_id))
        splits[role].update(num_documents=documents[role], num_tokens=by_role[role])
      description = ('by the source\'s own splits' if given else
                     f'by documents: {documents["validation"]:,} documents, {100 * share:.2f}% of the tokens')
      holdout = {'by': 'documents', 'description': description}
    else:
      holdout = _hold_out_tail(config, results, keep, writers, splits, total, eos_id)
      holdout['description'] += (f' (by documents it would have been {documents["validation"]} documents, '
                                 f'{100 * share:.2f}% of the tokens)')
  finally:
    for writer in writers.values():
      writer.close()
  for role in sources.ROLES:
    splits[role]['shards'] = writers[role].shards
  return holdout


def _hold_out_tail(config, results, keep, writers, splits, total, eos_id) -> dict:
  """Validation = the last validation_fraction of the stream of all kept documents, cut at the nearest document
  boundary when that leaves between half and twice the wanted share, else inside a document (whose head then
  ends the train split with an EOS of its own)."""
  if total < 2:
    raise PrepareError(f'{_source_description(config)}: {total} tokens after cleaning; too few to hold out a '
                       f'validation split')
  wanted = max(1, round(config.data.validation_fraction * total))
  ends = np.cumsum(np.concatenate([r.lengths[k] + 1 for r, k in zip(results, keep)]))
  cut = total - wanted
  boundaries = ends[ends < total]
  at_boundary = False
  if boundaries.size:
    nearest = int(boundaries[np.argmin(np.abs(boundaries - cut))])
    if wanted / 2 <= total - nearest <= 2 * wanted:
      cut, at_boundary = nearest, True
  first_validation_doc = int(np.searchsorted(ends, cut, side='right'))
  splits['train'].update(num_documents=first_validation_doc + (0 if at_boundary else 1),
                         num_tokens=cut + (0 if at_boundary else 1))
  splits['validation'].update(num_documents=ends.size - first_validation_doc, num_tokens=total - cut)
  for key in list(splits['validation']):  # the hash roles mean nothing here: all counts belong to the pool
    if key not in ('num_documents', 'num_tokens'):
      splits['train'][key] += splits['validation'][key]
      splits['validation'][key] = 0
  position = 0
  for result, kept in zip(results, keep):
    stream = _with_eos(result, kept, eos_id)
    head = stream[:max(0, cut - position)]
    writers['train'].write(head)
    writers['validation'].write(stream[head.size:])
    position += stream.size
  if not at_boundary:
    writers['train'].write(np.array([eos_id], np.uint32))
  where = 'at a document boundary' if at_boundary else 'inside a document'
  return {'by': 'tokens', 'cut_at_document_boundary': at_boundary,
          'description': f'by tokens: the last {total - cut:,} of {total:,} tokens '
                         f'({100 * (total - cut) / total:.2f}%), cut {where}'}


def summary(index: dict) -> str:
  train, validation = index['splits']['train'], index['splits']['validation']
  return (f'{index["source"]}: train {train["num_documents"]:,} docs / {train["num_tokens"]:,} tokens, '
          f'validation {validation["num_documents"]:,} docs / {validation["num_tokens"]:,} tokens, '
          f'vocab {index["tokenizer"]["vocab_size"]}, unigram entropy {index["unigram_entropy"]:.3f} nats '
          f'(perplexity {index["unigram_perplexity"]:.1f}), built in {index["seconds"]:.1f}s '
          f'({index["input_mb_per_s"]:.2f} MB/s of input text)')
