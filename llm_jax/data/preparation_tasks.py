"""The parallel part of preparation: each task reads its documents, cleans and filters them, tokenizes them and
writes its own files; preparation.py then decides duplicates and the validation split over all tasks and writes
the shards. Tasks are a fixed cut of the source (sources.document_tasks), so the output does not depend on how
many workers run them.

Per task N, in the work directory:

  task-N.tokens   uint32 token ids of the task's surviving documents, one after the other (no EOS)
  task-N.npz      per surviving document: length, role (0 train, 1 validation), blake2b digest of the cleaned
                  text, MinHash signature (config.data.near_dedup)
  task-N.json     counts: per role documents read, input characters, replaced bytes, escape sequences removed,
                  drops per rule, characters tokenized and of them those spelled as bytes; skipped files
  task-N.error    instead of the above when the task met a user error (bad JSONL line, ...): its message

Workers: one runs the tasks in this process; more run them through datatrove's LocalPipelineExecutor (a process
pool), each task a pipeline of one step, `PrepareTaskStep`. The same step runs on datatrove's SlurmPipelineExecutor
or RayPipelineExecutor for a cluster (docs/data.md).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from llm_jax.data import cleaning
from llm_jax.data import sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.errors import UserError

_ENCODE_BATCH_CHARS = 4_000_000  # characters handed to SentencePiece's threads at once
_ROLE_IDS = {'train': 0, 'validation': 1}


def _path(work: str, index: int, suffix: str) -> str:
  return os.path.join(work, f'task-{index:05d}.{suffix}')


def empty_stats(filter_names) -> dict:
  return {role: dict(documents_read=0, input_chars=0, replaced_bytes=0, escape_sequences=0, dropped_short=0,
                     **{f'dropped_{name}': 0 for name in filter_names}, tokenized_chars=0, byte_fallback_chars=0)
          for role in sources.ROLES}


def run_task(config, index: int, task: sources.Task, tokenizer_path: str, work: str, threads: int,
             on_documents=None) -> None:
  """Runs one task, writing its files (or its .error) into `work`. `on_documents(n)` reports progress."""
  try:
    _run_task(config, index, task, tokenizer_path, work, threads, on_documents)
  except UserError as e:
    _write_atomically(_path(work, index, 'error'), str(e).encode())


def _write_atomically(path: str, data: bytes) -> None:
  with open(path + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def _run_task(config, index, task, tokenizer_path, work, threads, on_documents):
  tokenizer = tokenizer_lib.load(tokenizer_path, config.data.add_bos)
  prefix = np.asarray(tokenizer.input_prefix, np.uint32)  # BOS before each document where the model expects one
  # Characters spelled as bytes (SentencePiece byte fallback); a byte-level tokenizer spells everything so.
  byte_starts = tokenizer.byte_fallback_starts() if hasattr(tokenizer, 'byte_fallback_starts') else None
  filters = cleaning.Filters(cleaning.filter_names(config))
  hasher = cleaning.MinHasher() if config.data.near_dedup else None
  stats, skipped = empty_stats(filters.names), collections.Counter()
  lengths, roles, digests, signatures = [], [], [], []
  read = collections.Counter()
  tokens_path = _path(work, index, 'tokens')
  with open(tokens_path + '.tmp', 'wb') as out:
    batch, batch_roles, chars = [], [], 0

    def flush():
      for ids, role in zip(tokenizer.encode_batch(batch, num_threads=threads), batch_roles):
        ids = np.concatenate([prefix, np.asarray(ids, np.uint32)])
        out.write(ids.tobytes())
        lengths.append(len(ids))
        if byte_starts is not None:
          stats[role]['byte_fallback_chars'] += int(byte_starts[ids].sum())
      if on_documents:
        on_documents(len(batch))

    for doc in sources.task_documents(config, task, skipped):
      if config.data.max_docs and read[doc.role] >= config.data.max_docs:
        continue
      read[doc.role] += 1
      counts = stats[doc.role]
      counts['documents_read'] += 1
      counts['input_chars'] += len(doc.text)
      counts['replaced_bytes'] += doc.replaced
      text, escapes = sources.clean_counted(doc.text)
      counts['escape_sequences'] += escapes
      if len(text) < config.data.min_doc_chars:
        counts['dropped_short'] += 1
        continue
      rejection = filters.rejection(text)
      if rejection:
        counts[f'dropped_{rejection}'] += 1
        continue
      roles.append(_ROLE_IDS[doc.role])
      digests.append(np.frombuffer(hashlib.blake2b(text.encode(), digest_size=16).digest(), np.uint8))
      if hasher:
        signature = hasher.signature(text)
        signatures.append(signature if signature is not None else np.zeros(hasher.bands * hasher.rows, np.uint64))
      batch.append(text)
      batch_roles.append(doc.role)
      counts['tokenized_chars'] += len(text)
      chars += len(text)
      if chars >= _ENCODE_BATCH_CHARS:
        flush()
        batch, batch_roles, chars = [], [], 0
    if batch:
      flush()
  os.replace(tokens_path + '.tmp', tokens_path)
  arrays = dict(lengths=np.asarray(lengths, np.int64), roles=np.asarray(roles, np.int8),
                digests=np.asarray(digests, np.uint8).reshape(-1, 16))
  if hasher:
    arrays['signatures'] = np.asarray(signatures, np.uint64).reshape(len(lengths), -1)
  with open(_path(work, index, 'npz.tmp'), 'wb') as f:
    np.savez(f, **arrays)
  os.replace(_path(work, index, 'npz.tmp'), _path(work, index, 'npz'))
  _write_atomically(_path(work, index, 'json'), json.dumps({'stats': stats, 'skipped': skipped}).encode())


class TaskResult:
  """What one task wrote, loaded back."""

  def __init__(self, work: str, index: int):
    self.tokens_path = _path(work, index, 'tokens')
    with np.load(_path(work, index, 'npz')) as arrays:
      self.lengths, self.roles, self.digests = arrays['lengths'], arrays['roles'], arrays['digests']
      self.signatures = arrays['signatures'] if 'signatures' in arrays else None
    with open(_path(work, index, 'json')) as f:
      summary = json.load(f)
    self.stats, self.skipped = summary['stats'], collections.Counter(summary['skipped'])
    self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

  def tokens(self) -> np.ndarray:
    if not self.lengths.sum():
      return np.zeros(0, np.uint32)
    return np.memmap(self.tokens_path, dtype=np.uint32, mode='r')


def _make_step_class():
  from datatrove.pipeline.base import PipelineStep  # pylint: disable=g-import-not-at-top

  class PrepareTaskStep(PipelineStep):
    """A datatrove pipeline step that runs preparation task `rank` (see the module docstring)."""

    name = 'llm_jax prepare task'
    type = 'llm_jax'

    def __init__(self, config_dict: dict, tasks: list, tokenizer_path: str, work: str, threads: int):
      super().__init__()
      self.config_dict, self.tasks = config_dict, tasks
      self.tokenizer_path, self.work, self.threads = tokenizer_path, work, threads

    def run(self, data=None, rank: int = 0, world_size: int = 1):
      import ml_collections  # pylint: disable=g-import-not-at-top
      from datatrove.utils.logging import logger  # pylint: disable=g-import-not-at-top
      logger.remove()  # the task's own banner and statistics would repeat once per task; errors come back as files
      config = ml_collections.ConfigDict(self.config_dict)
      run_task(config, rank, self.tasks[rank], self.tokenizer_path, self.work, self.threads)
      return iter(())

  return PrepareTaskStep


def run_all(config, tasks: list[sources.Task], tokenizer_path: str, work: str, workers: int, bar=None,
            executor=None, poll_seconds: float = 10.0) -> None:
  """Runs every task: with `executor` (a function (step, num_tasks) -> datatrove executor, e.g. Slurm's) on it,
  waiting until every task has written its files; else in this process when `workers` is 1 (or there is one
  task), else on datatrove's local executor with `workers` processes. Raises the first task's user error (in
  task order)."""
  cores = os.cpu_count() or 1
  workers = max(1, min(workers, len(tasks)))
  if executor is None and workers > 1 and not config.data.prepare_workers and not _has_datatrove():
    print('prepare: one worker (datatrove is not installed; pip install "llm_jax[data]" for parallel preparation)')
    workers = 1
  if executor is not None:
    # threads=0: each task encodes on all the cores of the node it runs on.
    executor(prepare_step(config, tasks, tokenizer_path, work, 0), len(tasks)).run()
    _wait_for_tasks(work, len(tasks), poll_seconds)
  elif workers == 1:
    for index, task in enumerate(tasks):
      run_task(config, index, task, tokenizer_path, work, cores, bar.update if bar is not None else None)
  else:
    _run_on_datatrove(config, tasks, tokenizer_path, work, workers, max(1, cores // workers))
  for index in range(len(tasks)):
    if os.path.exists(_path(work, index, 'error')):
      with open(_path(work, index, 'error')) as f:
        raise sources.SourceError(f.read())
    if not os.path.exists(_path(work, index, 'json')):
      raise RuntimeError(f'preparation task {index} of {len(tasks)} did not finish (see its log above)')
  if bar is not None and (workers > 1 or executor is not None):
    bar.update(sum(v['documents_read'] for i in range(len(tasks))
                   for v in TaskResult(work, i).stats.values()))


def prepare_step(config, tasks: list[sources.Task], tokenizer_path: str, work: str, threads: int):
  """The datatrove pipeline step that runs task `rank` of `tasks`: give it to any datatrove executor with
  tasks=len(tasks) (LocalPipelineExecutor here; SlurmPipelineExecutor or RayPipelineExecutor on a cluster)."""
  return _make_step_class()(config.to_dict(), list(tasks), tokenizer_path, work, threads)


def _wait_for_tasks(work: str, count: int, poll_seconds: float) -> None:
  """Returns once every task wrote its .json or .error (a cluster executor's run() may return on submission)."""
  import time  # pylint: disable=g-import-not-at-top
  last_report = 0.0
  while True:
    done = sum(os.path.exists(_path(work, i, 'json')) or os.path.exists(_path(work, i, 'error'))
               for i in range(count))
    if done == count:
      return
    if time.time() - last_report > 60:
      print(f'prepare: {done} of {count} tasks done; waiting for the others (their logs are in the executor\'s '
            f'logging_dir)')
      last_report = time.time()
    time.sleep(poll_seconds)


def datatrove_executor(kind: str, options: dict, logging_dir: str):
  """A function (step, num_tasks) -> datatrove executor of `kind` ('local', 'slurm' or 'ray'), built with
  `options` (keyword arguments of that executor, e.g. partition, time, cpus_per_task for Slurm)."""
  try:
    from datatrove import executor as executors  # pylint: disable=g-import-not-at-top
    cls = {'local': executors.LocalPipelineExecutor, 'slurm': executors.SlurmPipelineExecutor,
           'ray': executors.RayPipelineExecutor}[kind]
  except ImportError as e:
    raise cleaning.CleaningError(f'--executor={kind} needs datatrove (and ray for ray): {e}') from None
  except KeyError:
    raise cleaning.CleaningError(f'--executor: unknown executor {kind!r}; expected local, slurm or ray') from None

  def make(step, num_tasks):
    try:
      return cls(pipeline=[step], tasks=num_tasks, logging_dir=logging_dir, skip_completed=False, **options)
    except TypeError as e:
      raise cleaning.CleaningError(f'--executor_option: {e}') from None
  return make


def _has_datatrove() -> bool:
  try:
    import datatrove.executor  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _run_on_datatrove(config, tasks, tokenizer_path, work, workers, threads) -> None:
  try:
    from datatrove.executor import LocalPipelineExecutor  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise cleaning.CleaningError('config.data.prepare_workers > 1 needs datatrove: pip install '
                                 '"datatrove>=0.4,<0.11" (or set config.data.prepare_workers=1)') from None
  step = prepare_step(config, tasks, tokenizer_path, work, threads)
  logs = tempfile.mkdtemp(prefix='llm-jax-prepare-logs-')
  try:
    executor = LocalPipelineExecutor(pipeline=[step], tasks=len(tasks), workers=workers, logging_dir=logs,
                                     skip_completed=False)
    import multiprocess  # pylint: disable=g-import-not-at-top
    # The executor's Manager uses the default start method, fork; forking a process that runs JAX threads can
    # deadlock, so the Manager starts from the fork server too (as the pool does), and the default is restored.
    previous = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method('forkserver', force=True)
    try:
      executor.run()
    finally:
      multiprocess.set_start_method(previous, force=True)
  finally:
    shutil.rmtree(logs, ignore_errors=True)


