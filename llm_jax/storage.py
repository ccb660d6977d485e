"""One path layer: local paths and object-store URLs (gs://bucket/..., s3://bucket/...) behave the same.

Every file llm_jax reads or writes outside a checkpoint goes through these functions (config.json, the
tokenizer and its fingerprint, metrics.jsonl, TensorBoard events, eval outputs, prepared data, HF folders).
Checkpoints are written by orbax straight to the same URL (checkpoint.py); orbax's own directory operations use
etils.epath, which this module points at fsspec too (EPATH_USE_TF=false, below).

Library: fsspec, with gcsfs (gs://) and s3fs (s3://). Why fsspec and not tf.io.gfile or etils.epath:
  - no TensorFlow: the GPU image has none, and tf.io.gfile is the only gs:// backend of TensorFlow;
  - etils.epath switches to tf.io.gfile whenever TensorFlow happens to be installed, so the same URL would take
    different code paths (and different emulator settings) on different images; fsspec is one code path;
  - ranged reads (`read_range`: one HTTP range request) for the training iterator's shards;
  - the clients' standard settings and credential chains, nothing of our own: gcsfs uses Google's application
    default credentials (then the metadata server, then anonymous) and STORAGE_EMULATOR_HOST; s3fs uses botocore's
    chain (environment, profile, instance role) and AWS_ENDPOINT_URL. Nothing is read or logged beyond that.

Atomic writes (`write_bytes`, `write_text`, `write_json`): a reader sees the old file or the new one, never half.
  - local: write a temporary name in the same directory, then os.replace (a rename within one file system);
  - object store: one single-object PUT of the whole content. GCS and S3 make an object visible only when its
    upload completes and replace it as a whole (strongly consistent read-after-write), so the PUT itself is the
    atomic step. Write-then-rename would be WORSE there: a "rename" is a copy plus a delete, two requests.
Appending (metrics.jsonl) has no object-store equivalent: metrics.MetricsWriter rewrites the whole object.

Errors: a missing bucket, no permission or no credentials is one `StorageError` (a UserError) naming the URL,
raised by `check_writable` / `check_readable` before any training starts.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from typing import Any, Iterator

from llm_jax.errors import UserError

# orbax's directory operations go through etils.epath: keep them on fsspec (like this module) even where
# TensorFlow is installed, so the same code path and emulator settings hold on every image.
os.environ.setdefault('EPATH_USE_TF', 'false')

SCHEMES = ('gs', 's3')


class StorageError(UserError, OSError):
  """A bucket or file cannot be reached (missing bucket, no permission, no credentials); names the URL."""


def is_url(path: str) -> bool:
  """Whether `path` is an object-store URL (gs://, s3://)."""
  return str(path).split('://', 1)[0] in SCHEMES and '://' in str(path)


def _scheme(path: str) -> str:
  return str(path).split('://', 1)[0]


def _fs(path: str):
  """The fsspec file system of a URL (instances are cached by fsspec)."""
  import fsspec  # lazily: local runs need no cloud client
  try:
    return fsspec.filesystem(_scheme(path))
  except ImportError as e:
    package = {'gs': 'gcsfs', 's3': 's3fs'}[_scheme(path)]
    raise StorageError(f'{path}: {package} is not installed (pip install {package}, or llm_jax[cloud])') from e


def absolute(path: str) -> str:
  """A local path made absolute (with ~ expanded); a URL without trailing slashes."""
  path = str(path)
  if is_url(path):
    scheme, rest = path.split('://', 1)
    return f'{scheme}://{posixpath.normpath(rest)}' if rest.strip('/') else f'{scheme}://{rest.strip("/")}'
  return os.path.abspath(os.path.expanduser(path))


def join(path: str, *parts: str) -> str:
  if is_url(path):
    return posixpath.join(str(path), *parts)
  return os.path.join(path, *parts)


def dirname(path: str) -> str:
  return posixpath.dirname(str(path).rstrip('/')) if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
  return posixpath.basename(str(path).rstrip('/')) if is_url(path) else os.path.basename(path)


def exists(path: str) -> bool:
  return _fs(path).exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  """Local: a directory. URL: a prefix with at least one object under it (object stores have no directories)."""
  return _fs(path).isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _fs(path).isfile(path) if is_url(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
  """Local: os.makedirs(exist_ok=True). URL: nothing (a prefix exists once an object is written under it)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names directly under `path` (files and sub-directories)."""
  if not is_url(path):
    return os.listdir(path)
  return [posixpath.basename(p.rstrip('/')) for p in _fs(path).ls(path, detail=False)
          if p.rstrip('/') != _strip_scheme(path).rstrip('/')]


def glob(pattern: str) -> list[str]:
  """Sorted matches of a glob (`**` recurses); URLs come back as URLs."""
  if not is_url(pattern):
    import glob as glob_lib
    return sorted(glob_lib.glob(os.path.expanduser(pattern), recursive=True))
  return sorted(f'{_scheme(pattern)}://{p}' for p in _fs(pattern).glob(pattern))


def size(path: str) -> int:
  return int(_fs(path).size(path)) if is_url(path) else os.path.getsize(path)


def _strip_scheme(path: str) -> str:
  return str(path).split('://', 1)[1]


def open(path: str, mode: str = 'r', **kwargs):  # pylint: disable=redefined-builtin
  """A file object, like builtins.open (text or binary). Writing to a URL uploads when the file is closed
  (one object, complete or absent); use write_bytes/write_text where replacing must be atomic locally too."""
  if not is_url(path):
    return builtins.open(path, mode, **kwargs)
  if 'a' in mode or '+' in mode:
    raise StorageError(f'{path}: object stores cannot append or update in place (mode {mode!r})')
  return _fs(path).open(path, mode, **kwargs)


def read_bytes(path: str) -> bytes:
  if is_url(path):
    return _fs(path).cat_file(path)
  with builtins.open(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def read_range(path: str, start: int, length: int) -> bytes:
  """`length` bytes at offset `start` of a file: one ranged request on an object store."""
  if is_url(path):
    return _fs(path).cat_file(path, start=start, end=start + length)
  with builtins.open(path, 'rb') as f:
    f.seek(start)
    return f.read(length)


def append_text(path: str, text: str) -> None:
  """Appends to a text file; on an object store (which cannot append) the object is rewritten whole, one PUT:
  for small, rarely written files (benchmark.jsonl), not for a stream of rows (see metrics.MetricsWriter)."""
  if not is_url(path):
    makedirs(os.path.dirname(os.path.abspath(path)))
    with builtins.open(path, 'a', encoding='utf-8') as f:
      f.write(text)
    return
  write_text(path, (read_text(path) if exists(path) else '') + text)


def read_ranges(paths: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
  """Byte ranges [start, end) of files (all local, or all in buckets), in order. On an object store they are
  one batch of concurrent ranged requests (fsspec's cat_ranges), not one request after another."""
  if paths and is_url(paths[0]):
    return _fs(paths[0]).cat_ranges(list(paths), list(starts), list(ends))
  return [read_range(p, s, e - s) for p, s, e in zip(paths, starts, ends)]


def write_bytes(path: str, data: bytes) -> None:
  """Replaces `path` atomically (see the module doc: temporary name + rename locally, one PUT on a bucket)."""
  if is_url(path):
    _fs(path).pipe_file(path, bytes(data))
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with builtins.open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def write_json(path: str, value: Any) -> None:
  """Indented, sorted JSON with a final newline, written atomically."""
  write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + '\n')


def remove(path: str) -> None:
  if is_url(path):
    _fs(path).rm_file(path)
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  """Removes a directory (a URL prefix) and everything under it; no error if it does not exist."""
  if is_url(path):
    if _fs(path).exists(path):
      _fs(path).rm(path, recursive=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def move(src: str, dst: str) -> None:
  """Moves a file or directory (a URL prefix) within one file system or bucket: a rename locally, a copy of each
  object then a delete on an object store."""
  if is_url(src):
    _fs(src).mv(src, dst, recursive=True)
  else:
    os.rename(src, dst)


def copy(src: str, dst: str) -> None:
  """Copies one file between any two of: local path, gs://, s3:// (the destination is replaced whole)."""
  if not is_url(src) and not is_url(dst):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    shutil.copyfile(src, dst)
  elif is_url(dst) and not is_url(src):
    _fs(dst).put_file(src, dst)
  elif is_url(src) and not is_url(dst):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    _fs(src).get_file(src, dst)
  else:
    write_bytes(dst, read_bytes(src))


def upload_dir(local_dir: str, dst: str) -> None:
  """Copies every file under `local_dir` to the same relative names under `dst` (a URL or a local path)."""
  for root, _, names in os.walk(local_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      copy(os.path.join(root, name), join(dst, *rel.split(os.sep)))


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
  """A local path with the file's content, for libraries that only open local files (sentencepiece,
  safetensors): the path itself when local, else a temporary download removed on exit."""
  if not is_url(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix='llm_jax-') as tmp:
    local = os.path.join(tmp, basename(path))
    _fs(path).get_file(path, local)
    yield local


@contextlib.contextmanager
def local_dir(path: str) -> Iterator[str]:
  """A local directory with the files under `path`, for readers that need a local file system (safetensors'
  memory maps): `path` itself when local, else a temporary download removed on exit."""
  if not is_url(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix='llm_jax-') as tmp:
    for remote in _fs(path).find(path):
      rel = posixpath.relpath(remote, _strip_scheme(path).rstrip('/'))
      local = os.path.join(tmp, *rel.split('/'))
      os.makedirs(os.path.dirname(local), exist_ok=True)
      _fs(path).get_file(remote, local)
    yield tmp


@contextlib.contextmanager
def staged_dir(dst: str) -> Iterator[str]:
  """A local directory whose files are uploaded to `dst` on a clean exit (`dst` itself when local).

  For writers that need a local file system (tensorboardX, safetensors); an exception uploads nothing.
  """
  if not is_url(dst):
    os.makedirs(dst, exist_ok=True)
    yield dst
    return
  with tempfile.TemporaryDirectory(prefix='llm_jax-') as tmp:
    yield tmp
    upload_dir(tmp, dst)


def _describe(url: str, error: Exception) -> str:
  text = str(error) or type(error).__name__
  lowered = text.lower()
  if isinstance(error, FileNotFoundError) or 'does not exist' in lowered or 'not found' in lowered:
    return f'{url}: the bucket does not exist ({text.splitlines()[0]})'
  if isinstance(error, PermissionError) or any(w in lowered for w in ('403', '401', 'denied', 'forbidden',
                                                                        'credential', 'unauthorized')):
    return (f'{url}: no permission or no credentials ({text.splitlines()[0]}); llm_jax uses the standard chains: '
            f'Google application default credentials for gs://, the AWS environment/profile for s3://')
  return f'{url}: cannot be reached ({type(error).__name__}: {text.splitlines()[0]})'


def check_writable(directory: str) -> None:
  """Writes and removes a small probe under `directory`; one StorageError naming the URL/path if that fails."""
  probe = join(directory, f'.write_probe_{os.getpid()}')
  try:
    makedirs(directory)
    write_bytes(probe, b'ok')
    remove(probe)
  except Exception as e:  # the clients raise many types (HttpError, ClientError, OSError, auth errors)
    if not is_url(directory):
      raise StorageError(f'{directory} is not writable: {getattr(e, "strerror", None) or e}') from e
    raise StorageError(_describe(directory, e)) from e


def check_readable(directory: str) -> None:
  """Lists `directory` (a URL); one StorageError naming it when its bucket cannot be read (no permission, no
  credentials). A missing prefix is not an error here: the caller names the file it did not find."""
  if not is_url(directory):
    return
  try:
    _fs(directory).ls(directory, detail=False)
  except FileNotFoundError:
    return
  except Exception as e:
    raise StorageError(_describe(directory, e)) from e
