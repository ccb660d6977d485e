"""Which accelerators this host has, and the start-up that follows: a job on a machine without one starts quietly.

The test extras install the CUDA plugin and libtpu (the 'aot' extra: compile-only devices for `--dry_run
--target`). On a machine with neither an NVIDIA GPU nor a TPU, jax would still try both when its backends start:
the CUDA plugin's version check fails (`Jax plugin configuration error ... cuInit(0) failed` and a traceback) and
libtpu complains about its environment (`unexpected worker hostname`, `TPU_ACCELERATOR_TYPE`) before jax falls
back to the CPU. `quiet_start()` (called by `cli.run`, so by every job) settles that beforehand:

  JAX_PLATFORMS set by the user   nothing changes
  an NVIDIA GPU, TPU chip or      nothing changes: jax finds and tries them as before (the same checks jax makes:
  AMD GPU on this host            /dev/nvidia0, /dev/nvidiactl, /dev/dxg; TPU chips on the PCI bus; KFD nodes)
  none of them                    JAX_PLATFORMS=cpu, which is the platform jax ends with there anyway; the CUDA
                                  plugin then skips its check and stays registered, so a deviceless GPU compile
                                  (`--target=h100`) still works, and libtpu is loaded only by a TPU target's
                                  compile (targets.py gives it a quiet compile-only environment)

The decision is made before jax starts its backends (through jax's config, and JAX_PLATFORMS for the processes a
job starts); when they have already started, it is too late and nothing is changed.
"""

from __future__ import annotations

import os


def has_accelerator() -> bool:
  """True when jax could find an NVIDIA GPU, a TPU chip or an AMD GPU here (jax's own hardware checks; True too
  when this jax lacks one of them: then nothing is assumed)."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return (hardware_utils.has_visible_nvidia_gpu() or tpu_chips() > 0 or
            hardware_utils.num_available_amd_gpus(stop_at=1) != 0)  # -1: could not tell, so assume one
  except (ImportError, AttributeError, TypeError):
    return True


def tpu_chips() -> int:
  """TPU chips attached to this host (0 on anything but a TPU VM)."""
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def quiet_start() -> str | None:
  """Restrict jax to the CPU where this host has no accelerator and the user chose no platforms (see the module
  docstring). Returns the platforms set, or None where nothing was changed."""
  if os.environ.get('JAX_PLATFORMS') or 'JAX_FORCE_TPU_INIT' in os.environ:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if jax.config.jax_platforms or xla_bridge.backends_are_initialized() or has_accelerator():
    return None  # chosen already (a TPU VM's jax chooses 'tpu,cpu' when imported), too late, or not ours to choose
  os.environ['JAX_PLATFORMS'] = 'cpu'  # for the processes this one starts
  jax.config.update('jax_platforms', 'cpu')
  return 'cpu'
