"""Checkpoints under <workdir>/checkpoints/<step>/, written by orbax's CheckpointManager.

Each checkpoint has three items: `params`, `opt_state` (absent in a checkpoint made by convert) and `meta`
(JSON: step, tokenizer fingerprint, the model config). On a local disk orbax writes to a temporary directory and
renames it when the save is complete; on gs:// and s3:// (where a rename is a copy) it writes in place and adds
`commit_success.txt` last. Either way a save interrupted by a crash is never listed and never restored. Restores
put every array straight onto its target sharding (the abstract tree carries the shardings).

Object stores: the workdir may be gs://bucket/run or s3://bucket/run; orbax writes the arrays through tensorstore
straight to the bucket, with no local copy (docs/storage.md). orbax 0.12.8 maps gs:// to tensorstore's gcs
driver itself; s3:// it does not know, so `_orbax_s3` teaches it (see there).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from llm_jax import storage
from llm_jax.errors import UserError

ITEMS = ('params', 'opt_state', 'meta')


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.absolute(workdir), 'checkpoints')


@functools.cache
def _orbax_s3() -> None:
  """Lets orbax 0.12.8 write s3:// checkpoints through tensorstore's s3 driver (it knows only gs://).

  orbax builds a tensorstore kvstore spec per array directory: for gs:// its `gcs` driver, for anything else the
  `file` driver on an absolute local path, which fails on s3://. We extend its three private helpers so that
  s3://bucket/path becomes {'driver': 's3', 'bucket': ..., 'path': ...}. tensorstore 0.1.86 does not reach an
  endpoint given only by the standard AWS_ENDPOINT_URL, so we pass it (and AWS_REGION / AWS_DEFAULT_REGION)
  in the spec; credentials stay tensorstore's own AWS chain (environment, profile, instance role).
  Tested against moto's S3 server (tests/test_object_store.py); a later orbax that knows s3:// makes this moot.
  """
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils

  use_remote_driver, normalize, kvstore_for = (tensorstore_utils._use_gcs_driver, tensorstore_utils._normalize_path,
                                               gcs_utils.get_kvstore_for_gcs)

  def kvstore(path: str) -> dict:
    if not path.startswith('s3://'):
      return kvstore_for(path)
    bucket, _, key = path[len('s3://'):].partition('/')
    spec = {'driver': 's3', 'bucket': bucket, 'path': key}
    endpoint = os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL')
    region = os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION')
    if endpoint:
      spec['endpoint'] = endpoint
    if region:
      spec['aws_region'] = region
    return spec

  tensorstore_utils._use_gcs_driver = lambda directory: directory.startswith('s3://') or use_remote_driver(directory)
  tensorstore_utils._normalize_path = lambda path: (
      's3://' + os.path.normpath(path[len('s3://'):]) if path.startswith('s3://') else normalize(path))
  gcs_utils.get_kvstore_for_gcs = kvstore


def _options(directory: str, **kwargs) -> ocp.CheckpointManagerOptions:
  """Manager options for `directory`; on s3:// a save is committed by a marker file, not by a rename."""
  if directory.startswith('s3://'):
    _orbax_s3()
    # A "rename" on S3 is a copy of every object: orbax's commit-file protocol (its default on gs://) instead.
    kwargs['temporary_path_class'] = ocp.path.atomicity.CommitFileTemporaryPath
  return ocp.CheckpointManagerOptions(**kwargs)


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save cut short by a crash leaves a temporary directory; remove it on restart.
  directory = checkpoint_dir(workdir)
  options = _options(directory, max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                     cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def _reader(workdir: str) -> ocp.CheckpointManager:
  directory = checkpoint_dir(workdir)
  return ocp.CheckpointManager(directory, item_names=ITEMS, options=_options(directory, read_only=True))


def latest_step(workdir: str) -> int | None:
  """The step of the newest complete checkpoint, or None."""
  if not storage.isdir(checkpoint_dir(workdir)):
    return None
  manager = _reader(workdir)
  try:
    return manager.latest_step()
  finally:
    manager.close()


class CheckpointError(UserError, OSError):
  """A save failed (unwritable directory, full disk, ...); the message names the last complete checkpoint."""


def check_writable(workdir: str) -> None:
  """Fails before training starts when the workdir cannot be written."""
  try:
    storage.check_writable(checkpoint_dir(workdir))
  except storage.StorageError as e:
    if storage.is_url(workdir):
      raise CheckpointError(f'workdir {e}') from e
    cause = e.__cause__
    raise CheckpointError(f'workdir {workdir} is not writable: {getattr(cause, "strerror", None) or cause}') from e


def _failed(manager, what: str, error: Exception) -> CheckpointError:
  try:
    last = manager.latest_step()
  except Exception:  # the manager itself may be what failed
    last = None
  last_good = f'{manager.directory}/{last}' if last is not None else 'none'
  return CheckpointError(f'{what} failed: {error}; the last complete checkpoint is {last_good}')


def save(manager: ocp.CheckpointManager, step: int, params, opt_state=None, meta: dict | None = None,
         force: bool = False) -> bool:
  """Starts an (async) save of one step; returns whether a save was started."""
  items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
  try:
    return manager.save(int(step), args=ocp.args.Composite(**items), force=force)
  except Exception as e:  # includes the error of a previous async save, raised here
    raise _failed(manager, f'saving checkpoint step {step} to {manager.directory}', e) from e


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until background saves are complete; a failed one raises CheckpointError."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise _failed(manager, f'writing a checkpoint to {manager.directory}', e) from e


def _abstract(tree):
  """ShapeDtypeStructs (with shardings where the leaves have them) for StandardRestore."""
  def leaf(x):
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


def restore(manager: ocp.CheckpointManager, step: int, params_like, opt_state_like=None) -> dict[str, Any]:
  """Restores `params` (and `opt_state` when a template is given) onto the templates' shardings, and `meta`."""
  items = dict(params=ocp.args.StandardRestore(_abstract(params_like)), meta=ocp.args.JsonRestore())
  if opt_state_like is not None:
    items['opt_state'] = ocp.args.StandardRestore(_abstract(opt_state_like))
  return dict(manager.restore(int(step), args=ocp.args.Composite(**items)))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The JSON meta of a checkpoint alone (cheap): check compatibility before restoring arrays."""
  return dict(manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])


def load_params(workdir: str, params_like, step: int | None = None, check_meta=None) -> tuple[Any, dict]:
  """Parameters and meta of a workdir's checkpoint (latest by default), for init_from, generate, convert.

  `check_meta(meta)`, if given, runs before any array is read (to raise a clear error on a mismatch).
  """
  step = latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir}: no complete checkpoint under {checkpoint_dir(workdir)}')
  manager = _reader(workdir)
  try:
    if check_meta is not None:
      check_meta(read_meta(manager, step))
    restored = restore(manager, step, params_like)
  finally:
    manager.close()
  return restored['params'], dict(restored['meta'])


def write_json_atomic(path: str, value) -> None:
  """Writes JSON so a reader never sees half a file (storage.write_json: rename locally, one PUT on a bucket)."""
  storage.write_json(path, value)
