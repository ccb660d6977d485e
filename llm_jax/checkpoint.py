"""Checkpoints under <workdir>/checkpoints/<step>/, written by orbax's CheckpointManager.

Each checkpoint has three items: `params`, `opt_state` (absent in a checkpoint made by convert) and `meta`
(JSON: step, tokenizer fingerprint, the model config). Orbax writes to a temporary directory and renames it when
the save is complete, so a save interrupted by a crash is never listed and never restored. Restores put every
array straight onto its target sharding (the abstract tree carries the shardings).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from llm_jax.errors import UserError

ITEMS = ('params', 'opt_state', 'meta')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save cut short by a crash leaves a temporary directory; remove it on restart.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def latest_step(workdir: str) -> int | None:
  """The step of the newest complete checkpoint, or None."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return manager.latest_step()
  finally:
    manager.close()


class CheckpointError(UserError, OSError):
  """A save failed (unwritable directory, full disk, ...); the message names the last complete checkpoint."""


def check_writable(workdir: str) -> None:
  """Fails before training starts when the workdir cannot be written."""
  try:
    os.makedirs(checkpoint_dir(workdir), exist_ok=True)
    probe = os.path.join(checkpoint_dir(workdir), f'.write_probe_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f'workdir {workdir} is not writable: {e.strerror or e}') from e


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
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    if check_meta is not None:
      check_meta(read_meta(manager, step))
    restored = restore(manager, step, params_like)
  finally:
    manager.close()
  return restored['params'], dict(restored['meta'])


def write_json_atomic(path: str, value) -> None:
  """Writes JSON to a temporary name and renames it, so a reader never sees half a file."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True, default=str)
    f.write('\n')
  os.replace(tmp, path)
