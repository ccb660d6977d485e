"""The records every text source yields and the tasks that read them: shared by sources.py and the source
modules it dispatches to (hf_source.py), so that neither imports the other back."""

from __future__ import annotations

import dataclasses

from llm_jax.errors import UserError


class SourceError(UserError, ValueError):
  """The configured source cannot be read; the message names the field or file."""


@dataclasses.dataclass(frozen=True)
class Document:
  key: str  # where it comes from: a relative path, 'path:line', or 'split:index'
  text: str  # decoded, not yet cleaned
  replaced: int = 0  # bytes that were not UTF-8 and became U+FFFD
  role: str = ''  # 'train' or 'validation' once the source has assigned it


@dataclasses.dataclass(frozen=True)
class Task:
  """A piece of the source that one preparation task reads; the list of tasks does not depend on the number of
  workers, so neither does the output."""
  kind: str  # 'files' | 'tfds' | 'hf'
  files: tuple = ()  # files: (key, path) pairs, in listing order
  role: str = ''  # tfds / hf: the role of a given split; '' = each document's role by the hash of its key
  split: str = ''  # hf: the split's name
  shard: int = 0  # hf: rows [shard, shard+1) * len / num_shards of the split
  num_shards: int = 1
  size: int = 0  # input bytes, as far as known before reading (0 = unknown)
