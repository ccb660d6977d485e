"""Checkpoints under <workdir>/checkpoints/<step>/, written by orbax's CheckpointManager.

Each checkpoint has three items: `params`, `opt_state` (absent in a checkpoint made by convert) and `meta`
(JSON: step, tokenizer fingerprint, the model config). On a local disk orbax writes to a temporary directory and
renames it when the save is complete; on gs:// and s3:// (where a rename is a copy) it writes in place and adds
`commit_success.txt` last. Either way a save interrupted by a crash is never listed and never restored. Restores
put every array straight onto its target sharding (the abstract tree carries the shardings).

Object stores: the workdir may be gs://bucket/run or s3://bucket/run; orbax writes the arrays through tensorstore
straight to the bucket, with no local copy (docs/storage.md). orbax 0.12.8 maps gs:// to tensorstore's gcs
driver itself; s3:// it does not know, so `_orbax_s3` teaches it (see there).

A listed step can still be damaged: an array file truncated or overwritten after the save, a missing or invalid
`meta`, a step directory without orbax's commit marker `commit_success.txt` (orbax 0.12 writes it last in both
protocols; a directory without it was copied or synced half-way). Loaders go through `load_newest_intact`: it
tries the newest step, and on damage warns in one line naming the step and why, then tries the next older one.
Each array is read once (the restore itself is the check); only `meta` and the commit marker are checked before
it. Nothing is deleted; a training run moves a damaged step it skipped to <workdir>/checkpoints.damaged/
(`set_aside`), since orbax would never save a step at or below a listed one. A restore refused because the
target tree has other names or shapes than the stored one is not damage: it is the config that differs, and
`load_params` says what differs (`StructureMismatchError`, from orbax's metadata of the stored tree).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import warnings
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp
from llm_jax import storage
from llm_jax.errors import UserError

ITEMS = ('params', 'opt_state', 'meta')
COMMIT_MARKER = 'commit_success.txt'  # orbax writes it into a step directory last, when the step is complete
DAMAGED_DIR = 'checkpoints.damaged'  # where a training run moves the damaged steps it skipped

T = TypeVar('T')


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


def latest_step(workdir: str) -> int | None:
  """The step of the newest complete checkpoint, or None."""
  if not storage.isdir(checkpoint_dir(workdir)):
    return None
  manager = read_only_manager(workdir)
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
  return CheckpointError(f'{what} failed: {_one_line(error)}; the last complete checkpoint is {last_good}')


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


class DamagedCheckpointError(CheckpointError):
  """One step is damaged (unreadable arrays, missing or invalid meta, no commit marker); names the step and why."""


class NoIntactCheckpointError(CheckpointError):
  """Every step of a workdir is damaged; the message names the workdir and each step tried."""


class _DropReadOnlyNotice(logging.Filter):
  def filter(self, record):
    return not str(record.msg).startswith('Given directory is read only')


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
  """A manager that lists and restores only. The options orbax would otherwise 'correct' with a warning are set
  as read-only wants them, and its notice that the directory is read only (expected here) is dropped."""
  directory = checkpoint_dir(workdir)
  options = _options(directory, read_only=True, save_interval_steps=0, max_to_keep=None, create=False)
  notice = _DropReadOnlyNotice()
  logging.getLogger('absl').addFilter(notice)
  try:
    return ocp.CheckpointManager(directory, item_names=ITEMS, options=options)
  finally:
    logging.getLogger('absl').removeFilter(notice)


def _one_line(error: BaseException) -> str:
  """The first line of an error, without tensorstore's multi-line spec dump (from which the array is named)."""
  text = str(error).strip()
  arrays = re.findall(r"'path': '([^/'][^']*?)/?'", text)  # relative kvstore path: the array's name
  items = re.findall(r"'path': '(/[^']*?)/?'", text)  # absolute path: the item's directory
  if 'Encountered error while reading array' in text and arrays:
    item = f' of {os.path.basename(items[-1])}' if items else ''
    return f'unreadable array {arrays[-1]}{item}'
  text = text.split('\n')[0].split(' See full TensorStore details')[0]
  text = text if len(text) <= 200 else text[:200] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def is_damage(error: BaseException) -> bool:
  """Whether a failed restore points at the files of that step, not at the config (a UserError, or a tree of
  another structure or shapes than the one asked for) or the machine (out of memory), so that the next older step
  is worth trying."""
  if isinstance(error, (UserError, MemoryError)) or not isinstance(error, Exception):
    return False
  return 'RESOURCE_EXHAUSTED' not in str(error) and not is_structure_mismatch(error)


def is_structure_mismatch(error: BaseException) -> bool:
  """orbax's refusal to restore into a tree of another structure or other shapes: the config, not the files,
  differs."""
  return isinstance(error, ValueError) and any(
      text in str(error) for text in ('tree structures do not match', 'is not compatible with the stored shape'))


class StructureMismatchError(UserError, ValueError):
  """An intact checkpoint holds other parameters (names or shapes) than the tree asked for; the message says which."""


def _shapes(tree) -> dict[str, tuple]:
  """'/'-joined leaf name -> shape."""
  return {jax.tree_util.keystr(path, simple=True, separator='/'): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def stored_shapes(manager: ocp.CheckpointManager, step: int, item: str = 'params') -> dict[str, tuple] | None:
  """Leaf name -> shape of one item of a step, from orbax's metadata (no array is read); None if unreadable."""
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(manager.directory / str(step) / item)
    return _shapes(getattr(metadata, 'tree', metadata))
  except Exception:  # pylint: disable=broad-except  (the caller falls back to orbax's own message)
    return None


def tree_differences(stored: dict[str, tuple], wanted: dict[str, tuple], limit: int = 4) -> str:
  """What differs between two {name: shape} trees, in one line ('' when nothing does): the names the wanted tree
  has and the stored one lacks, the reverse, and the shapes that differ (at most `limit` of each, then a count)."""
  def listed(names):
    names = sorted(names)
    more = f' (and {len(names) - limit} more)' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more
  missing, extra = set(wanted) - set(stored), set(stored) - set(wanted)
  shapes = [f'{name} {stored[name]} stored, {wanted[name]} wanted' for name in sorted(set(stored) & set(wanted))
            if stored[name] != wanted[name]]
  parts = []
  if missing:
    parts.append(f'{len(missing)} missing from the checkpoint: {listed(missing)}')
  if extra:
    parts.append(f'{len(extra)} in the checkpoint but not wanted: {listed(extra)}')
  if shapes:
    more = f' (and {len(shapes) - limit} more)' if len(shapes) > limit else ''
    parts.append(f'{len(shapes)} of other shapes: {"; ".join(shapes[:limit])}{more}')
  return '; '.join(parts)


def mismatch_error(manager: ocp.CheckpointManager, step: int, like, error: BaseException,
                   item: str = 'params') -> StructureMismatchError:
  """The one error for a restore refused because the tree differs: which names are missing or extra, which shapes
  differ (orbax's first line when the stored metadata cannot be read)."""
  _silence_abandoned_reads()  # orbax's reads of the other arrays of that step still finish, and fail, later
  stored = stored_shapes(manager, step, item)
  differs = tree_differences(stored, _shapes(like)) if stored is not None else ''
  return StructureMismatchError(f'{manager.directory}/{step}: the checkpoint is intact but its {item} differ from '
                                f'the ones asked for: {differs or _one_line(error)}')


def check_step(manager: ocp.CheckpointManager, step: int) -> dict:
  """The meta of one step after the cheap checks (commit marker, meta readable and naming this step); raises
  DamagedCheckpointError otherwise. Arrays are not read here: the restore that follows is their check."""
  where = f'{manager.directory}/{step}'
  if not storage.exists(storage.join(where, COMMIT_MARKER)):
    raise DamagedCheckpointError(f'{where}: incomplete commit (no {COMMIT_MARKER})')
  try:
    meta = read_meta(manager, step)
  except Exception as e:  # pylint: disable=broad-except  (missing item, truncated JSON, unreadable file)
    raise DamagedCheckpointError(f'{where}: unreadable meta ({_one_line(e)})') from e
  if meta.get('step') != step:
    raise DamagedCheckpointError(f'{where}: invalid meta (its step is {meta.get("step")!r})')
  return meta


_ABANDONED_READ = '_read_array_index_and_device_put'  # orbax's per-array read coroutine


def _is_abandoned_read_noise(exc, obj) -> bool:
  return (_ABANDONED_READ in repr(obj) or
          (isinstance(exc, RuntimeError) and 'Event loop is closed' in str(exc)) or
          'Encountered error while reading array' in str(exc))


class _DropAbandonedReadTask(logging.Filter):
  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and _is_abandoned_read_noise(exc, None))


def _silence_abandoned_reads() -> None:
  """After a failed restore, orbax's other array reads of that step still finish in tensorstore threads, after
  its event loop has closed; Python then prints each as an ignored exception (dozens of tracebacks for one
  truncated file). Drop exactly those reports, from now on; everything else still reaches the original hooks."""
  if getattr(sys.unraisablehook, 'llm_jax_filter', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read_noise(unraisable.exc_value, unraisable.object):
      previous(unraisable)

  hook.llm_jax_filter = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_DropAbandonedReadTask())
  warnings.filterwarnings('ignore', message=f"coroutine '{_ABANDONED_READ}' was never awaited")


def _agreed(ok: bool) -> bool:
  """True on every process when `ok` is true on every process (a step damaged for one is skipped by all)."""
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def warn(message: str) -> None:
  """One warning line on stderr (process 0 only), above the job's own output."""
  if jax.process_index() == 0:
    print(f'warning: {message}', file=sys.stderr, flush=True)


def load_newest_intact(manager: ocp.CheckpointManager, load: Callable[[int, dict], T], workdir: str,
                       step: int | None = None) -> tuple[int, T, list[int]]:
  """`load(step, meta)` of the newest intact step: (step, its result, the newer damaged steps skipped).

  A damaged step gets one warning line naming it and why, then the next older step is tried; errors that are
  not damage (a UserError such as an incompatible config, out of memory) propagate at once. With `step` given
  only that step is tried. Raises NoIntactCheckpointError naming the workdir and every step tried when none
  loads, FileNotFoundError when there is no step at all.
  """
  steps = sorted(manager.all_steps(), reverse=True) if step is None else [int(step)]
  if not steps:
    raise FileNotFoundError(f'{workdir}: no complete checkpoint under {checkpoint_dir(workdir)}')
  if step is not None and step not in manager.all_steps():
    available = ', '.join(map(str, sorted(manager.all_steps(), reverse=True))) or 'none'
    raise FileNotFoundError(f'{checkpoint_dir(workdir)}/{step}: no such checkpoint (steps: {available})')
  tried, skipped = [], []
  for i, candidate in enumerate(steps):
    try:
      result, reason = load(candidate, check_step(manager, candidate)), None
    except DamagedCheckpointError as e:
      reason = str(e).split(': ', 1)[-1]
    except Exception as e:  # pylint: disable=broad-except
      if not is_damage(e):
        raise
      reason = _one_line(e)
      _silence_abandoned_reads()
    if not _agreed(reason is None):
      reason = reason or 'damaged on another process'
    if reason is None:
      return candidate, result, skipped
    tried.append(f'{candidate} ({reason})')
    skipped.append(candidate)
    if step is not None:
      raise DamagedCheckpointError(f'{checkpoint_dir(workdir)}/{candidate} is damaged ({reason}); pick another '
                                   f'--step (steps: {", ".join(map(str, sorted(manager.all_steps(), reverse=True)))})')
    if i + 1 < len(steps):  # (the last one is named by the error below)
      warn(f'checkpoint {checkpoint_dir(workdir)}/{candidate} is damaged ({reason}); falling back to step '
           f'{steps[i + 1]}')
  raise NoIntactCheckpointError(f'no intact checkpoint in {workdir}: tried steps ' + '; '.join(tried))


def set_aside(manager: ocp.CheckpointManager, workdir: str, steps: list[int]) -> None:
  """Moves damaged steps out of checkpoints/ (never deletes them): orbax saves no step at or below a listed one,
  so a run that fell back past them could not save again. Process 0 moves; all processes then reload."""
  if not steps:
    return
  if jax.process_index() == 0:
    target_root = storage.join(storage.absolute(workdir), DAMAGED_DIR)
    storage.makedirs(target_root)
    for step in steps:
      target, n = storage.join(target_root, str(step)), 1
      while storage.exists(target):
        target, n = storage.join(target_root, f'{step}.{n}'), n + 1
      storage.move(storage.join(checkpoint_dir(workdir), str(step)), target)
      warn(f'moved the damaged checkpoint step {step} to {target}')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('llm_jax_set_aside')
  manager.reload()


def load_params(workdir: str, params_like, step: int | None = None, check_meta=None) -> tuple[Any, dict]:
  """Parameters and meta of a workdir's checkpoint, for init_from, generate, evaluate, convert: the newest intact
  step by default (damaged ones are skipped with a warning, see `load_newest_intact`), else `step`.

  `check_meta(meta)`, if given, runs before any array is read (to raise a clear error on a mismatch).
  `params_like` is the target tree, or a function of the step's meta returning it (when the tree depends on what
  the checkpoint holds, e.g. LoRA adapters). A tree that does not fit is a StructureMismatchError naming the
  missing, extra and reshaped leaves (never taken for damage). meta['step'] is the step loaded.
  """
  if not storage.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f'{workdir}: no complete checkpoint under {checkpoint_dir(workdir)}')
  manager = read_only_manager(workdir)

  def load(candidate, meta):
    if check_meta is not None:
      check_meta(meta)
    like = params_like(meta) if callable(params_like) else params_like
    try:
      params = restore(manager, candidate, like)['params']
    except ValueError as e:
      if is_structure_mismatch(e):
        raise mismatch_error(manager, candidate, like, e) from None
      raise
    if _shapes(params) != _shapes(like):  # (orbax restores a leaf saved from numpy in its stored shape when the
      raise mismatch_error(manager, candidate, like, ValueError('other shapes'))  # target has no sharding)
    return params, meta

  try:
    _, (params, meta), _ = load_newest_intact(manager, load, workdir, step)
  finally:
    manager.close()
  return params, dict(meta)


