"""The Hugging Face `datasets` source (config.data.source='hf_datasets'). `datasets` is optional (the llm_jax[data]
extra) and imported here only.

config.data.hf_path is what `datasets.load_dataset` takes first (a hub name such as 'roneneldan/TinyStories', a
local folder of data files, or a loader: 'json', 'parquet', 'text' with config.data.hf_data_files), or a folder
written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with `datasets.load_from_disk`). The text is
the column config.data.text_field.

Splits: when the dataset has both config.data.train_split and config.data.eval_split they are used as they are;
otherwise the train split (or the only one) is held out like text files (by a stable hash of 'split:row', or the
tail of the tokens). A non-streaming split is cut into tasks of about TASK_BYTES of Arrow data (row ranges), so
workers prepare it in parallel; a streamed split is one task.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Iterator

from llm_jax.data.documents import Document, SourceError, Task

TASK_BYTES = 32 << 20  # Arrow bytes of a split per task
_ROWS_PER_READ = 1_000


def _datasets():
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SourceError('config.data.source=hf_datasets needs the datasets package: '
                              'pip install "datasets>=3.0,<6" (the llm_jax[data] extra)') from None
  return datasets


def _is_saved_folder(path: str) -> bool:
  """A folder written by save_to_disk: a DatasetDict's dataset_dict.json or a Dataset's state.json."""
  return any(os.path.isfile(os.path.join(path, name)) for name in ('dataset_dict.json', 'state.json'))


@functools.lru_cache(maxsize=4)
def _load(hf_path: str, hf_name: str, hf_data_files: str, streaming: bool) -> dict:
  datasets = _datasets()
  path = os.path.expanduser(hf_path)
  try:
    if _is_saved_folder(path):
      loaded = datasets.load_from_disk(path)
    else:
      files = [f.strip() for f in hf_data_files.split(',') if f.strip()] or None
      loaded = datasets.load_dataset(hf_path, hf_name or None, data_files=files, streaming=streaming)
  except Exception as e:  # pylint: disable=broad-except
    # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError, ConnectionError, ...):
    # whatever it is, the user can only fix the fields that name the dataset.
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise SourceError(f'config.data.hf_path={hf_path!r}: cannot load it ({type(e).__name__}: '
                              f'{first_line[:300]})') from None
  if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
    return {'train': loaded}
  return dict(loaded)


def load(config) -> dict:
  """{split name: Dataset or IterableDataset}."""
  d = config.data
  return _load(d.hf_path, d.hf_name, d.hf_data_files, bool(d.hf_streaming))


def splits(config) -> list[tuple[str, str]]:
  """(split name, role) to read: both given splits, or the train split (or the only one) with role '' (held out
  by hash)."""
  d, loaded = config.data, load(config)
  if d.train_split in loaded and d.eval_split in loaded:
    return [(d.train_split, 'train'), (d.eval_split, 'validation')]
  if d.train_split in loaded:
    return [(d.train_split, '')]
  if len(loaded) == 1:
    return [(next(iter(loaded)), '')]
  raise SourceError(f'config.data.train_split: {d.train_split!r} is not a split of {d.hf_path}; its '
                            f'splits: {", ".join(loaded)}')


def has_given_splits(config) -> bool:
  return any(role for _, role in splits(config))


def _check_column(config, dataset, split: str) -> None:
  columns = dataset.column_names
  if columns is not None and config.data.text_field not in columns:
    raise SourceError(f'config.data.text_field: {config.data.text_field!r} is not a column of '
                              f'{config.data.hf_path} split {split!r}; columns: {", ".join(columns)}')


def tasks(config) -> list[Task]:
  datasets = _datasets()
  result = []
  for split, role in splits(config):
    dataset = load(config)[split]
    _check_column(config, dataset, split)
    if isinstance(dataset, datasets.IterableDataset) or config.data.max_docs:
      result.append(Task('hf', role=role, split=split))
      continue
    num_shards = max(1, min(len(dataset), math.ceil(dataset.data.nbytes / TASK_BYTES)))
    result += [Task('hf', role=role, split=split, shard=i, num_shards=num_shards,
                            size=dataset.data.nbytes // num_shards) for i in range(num_shards)]
  return result


def documents(config, task: Task) -> Iterator[Document]:
  """The rows of the task's split (its row range when not streamed) as documents keyed 'split:row'."""
  datasets = _datasets()
  dataset = load(config)[task.split]
  field = config.data.text_field
  if isinstance(dataset, datasets.IterableDataset):
    rows, start = dataset, 0
  else:
    size = len(dataset)
    start, end = size * task.shard // task.num_shards, size * (task.shard + 1) // task.num_shards
    rows = dataset.select_columns([field]).select(range(start, end))
  for offset, row in enumerate(rows):
    text = row.get(field)
    if text is None:
      continue
    if not isinstance(text, str):
      raise SourceError(f'{config.data.hf_path} split {task.split!r} row {start + offset}: '
                                f'config.data.text_field {field!r} is a {type(text).__name__}, not text')
    yield Document(f'{task.split}:{start + offset}', text)


def input_fingerprint(config) -> dict:
  """The datasets' own fingerprints (content hashes of their Arrow files) when they have them; for streamed
  datasets, the names and the sizes and mtimes of local data files."""
  d = config.data
  description = {'hf_path': d.hf_path, 'hf_name': d.hf_name, 'hf_data_files': d.hf_data_files,
                 'hf_streaming': bool(d.hf_streaming), 'text_field': d.text_field, 'splits': splits(config)}
  loaded = load(config)
  description['fingerprints'] = {split: getattr(loaded[split], '_fingerprint', None) for split, _ in splits(config)}
  files = []
  for pattern in filter(None, (f.strip() for f in d.hf_data_files.split(','))):
    import glob  # pylint: disable=g-import-not-at-top
    for path in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
      stat = os.stat(path)
      files.append([path, stat.st_size, stat.st_mtime_ns])
  description['files'] = files
  return description
