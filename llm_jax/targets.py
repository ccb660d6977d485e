"""Hardware to compile for without having it: `python -m llm_jax.main --config=... --dry_run --target=NAME`.

A target is a set of compile-only devices (`jax.experimental.topologies`), real TPU or NVIDIA devices that
XLA compiles for while nothing is allocated, so a TPU slice or an 8-GPU node can be checked from a CPU laptop:

  TPU slices, by Cloud TPU name      v4-8 ... v4-4096, v5p-8 ... v5p-12288 (the number counts TensorCores, two
                                     per chip, one megacore device per chip); v5e-4 ... v5e-256 and
                                     v6e-4 ... v6e-256 (the number counts chips, one device each)
  NVIDIA GPUs                        h100, h100x8, h200, h200x8, a100, a100x8: one node of 1 or 8 GPUs, described
                                     by llm_jax/target_specs/<gpu>.txtpb (sources in each file)

TPU targets need libtpu (`pip install 'jax[tpu]'` at the installed jax version), GPU targets the CUDA plugin
(`pip install 'jax[cuda12]'`); a missing one is one line naming the extra. `usable_fraction` is the share of a
device's memory that JAX uses by default: on GPUs the client preallocates 75% (XLA_PYTHON_CLIENT_MEM_FRACTION,
config.xla.gpu_memory_fraction); on TPUs the whole HBM is the runtime's.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re

import jax

from llm_jax import platforms
from llm_jax.errors import UserError

GIB = 1024 ** 3
SPEC_DIR = os.path.join(os.path.dirname(__file__), 'target_specs')
GPU_DEFAULT_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION when unset


class TargetError(UserError):
  """An unknown target name, or a target whose compiler plugin is not installed."""


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  topology_prefix: str  # what get_topology_desc calls the generation
  memory_gib: float  # HBM per chip that libtpu's compiler reports available when a step does not fit: v5p 95.73 GiB, v5e 15.75 (95 and 16 GB in the documentation); v4 32, v6e 32: the documentation's
  cores_per_device: int  # the name counts TensorCores (v4, v5p: 2 per chip, fused into one megacore device) or chips
  dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  max_chips: int


TPU_GENERATIONS = {
    'v4': TpuGeneration('v4', 32.0, 2, 3, 2048),
    'v5p': TpuGeneration('v5p', 95.73, 2, 3, 6144),
    'v5e': TpuGeneration('v5e', 15.75, 1, 2, 256),
    'v6e': TpuGeneration('v6e', 32.0, 1, 2, 256),
}
GPU_NODES = {'h100': 'h100.txtpb', 'h200': 'h200.txtpb', 'a100': 'a100.txtpb'}
GPU_COUNTS = (1, 8)


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str  # 'tpu' or 'gpu'
  num_devices: int
  memory_gib: float  # per device
  usable_fraction: float  # share of memory_gib JAX uses by default
  topology: str  # TPU: 'v5p:2x2x1'; GPU: the spec file name

  def devices(self) -> list:
    """The compile-only devices (cached: libtpu and the CUDA plugin build a topology once per process)."""
    return list(_devices(self))


def _tpu_shape(chips: int, dims: int) -> str | None:
  """The slice shape Cloud TPU builds for a chip count: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (3-D) or 2x2,
  2x4, 4x4, 4x8, 8x8, ... (2-D); None if no such slice exists (or one libtpu's compile-only topologies do not
  build: single-chip hosts)."""
  if dims == 2:
    shapes = {4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
    shape = shapes.get(chips)
  else:
    if chips < 4 or chips & (chips - 1):
      shape = None
    else:  # double the smallest axis, innermost first: 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> 4x4x8 ...
      shape = [2, 2, 1]
      while math.prod(shape) < chips:
        i = min(range(3), key=lambda a: (shape[a], -a))
        shape[i] *= 2
      shape = tuple(shape)
  return 'x'.join(map(str, shape)) if shape else None


def names() -> list[str]:
  """Examples of every target family, for messages and docs (any valid slice size is accepted)."""
  return (['v4-8', 'v4-16', 'v5p-8', 'v5p-64', 'v5e-4', 'v5e-8', 'v5e-256', 'v6e-8', 'v6e-256'] +
          [gpu if n == 1 else f'{gpu}x{n}' for gpu in GPU_NODES for n in GPU_COUNTS])


def get(name: str) -> Target:
  """The Target called `name` (see the module docstring); TargetError lists the valid forms."""
  key = name.strip().lower()
  match = re.fullmatch(r'(v4|v5p|v5e|v6e)-(\d+)', key)
  if match:
    generation = TPU_GENERATIONS[match.group(1)]
    count = int(match.group(2))
    chips = count // generation.cores_per_device
    shape = _tpu_shape(chips, generation.dims) if count % generation.cores_per_device == 0 and \
        chips <= generation.max_chips else None
    if shape is None:
      raise TargetError(f'--target={name}: no {match.group(1)} slice of that size; e.g. '
                        f'{match.group(1)}-{8 if generation.dims == 3 else 8}')
    return Target(key, 'tpu', chips, generation.memory_gib, 1.0, f'{generation.topology_prefix}:{shape}')
  match = re.fullmatch(r'(h100|h200|a100)(?:x(\d+))?', key)
  if match and int(match.group(2) or 1) in GPU_COUNTS:
    spec = GPU_NODES[match.group(1)]
    memory = int(re.search(r'device_memory_size:\s*(\d+)', _spec_text(spec)).group(1)) / GIB
    return Target(key, 'gpu', int(match.group(2) or 1), memory, GPU_DEFAULT_FRACTION, spec)
  raise TargetError(f'--target={name} is not a target; valid: TPU slices v4-N, v5p-N (N TensorCores), v5e-N, '
                    f'v6e-N (N chips), GPU nodes {", ".join(n for n in names() if not n.startswith("v"))}')


@functools.cache
def _spec_text(file_name: str) -> str:
  with open(os.path.join(SPEC_DIR, file_name)) as f:
    return f.read()


def _require_plugin(target: Target) -> None:
  if target.platform == 'tpu' and importlib.util.find_spec('libtpu') is None:
    raise TargetError(f'--target={target.name} compiles with libtpu, which is not installed: '
                      f'pip install "jax[tpu]=={jax.__version__}" (or the project extra: pip install -e ".[aot]")')
  if target.platform == 'gpu' and importlib.util.find_spec('jax_plugins.xla_cuda12') is None:
    raise TargetError(f'--target={target.name} compiles with the CUDA plugin, which is not installed: '
                      f'pip install "jax[cuda12]=={jax.__version__}" (or the project extra: pip install -e ".[aot]")')


def _compile_only_libtpu_environment(target: Target) -> None:
  """Off a TPU VM, libtpu finds no metadata server and says so at length (`unexpected worker hostname`, `please set
  env var TPU_ACCELERATOR_TYPE`) before a compile that needs none of it: tell it what it asks for, one host of the
  target's generation (the compile-only topology, not these, decides the devices). A TPU VM's own environment is
  left alone, and so is any of these the user set."""
  if platforms.tpu_chips():
    return
  generation, count = target.name.split('-')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', f'{"v5litepod" if generation == "v5e" else generation}-{count}')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_WORKER_ID', '0')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')


@functools.cache
def _devices(target: Target) -> tuple:
  from jax.experimental import topologies
  _require_plugin(target)
  # Compile-only devices need no chip: do not take libtpu's one-process-per-host lock (another job, a second
  # test worker, or training on this TPU VM may hold it).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if target.platform == 'tpu':
    _compile_only_libtpu_environment(target)
    megacore = TPU_GENERATIONS[target.topology.split(':')[0]].cores_per_device == 2
    kwargs = dict(chip_config_name='megacore') if megacore else {}
    topology = topologies.get_topology_desc(topology_name=target.topology, platform='tpu', **kwargs)
  else:
    topology = topologies.get_topology_desc(platform='cuda', topology_name=target.topology.split('.')[0],
                                            target_config=_spec_text(target.topology),
                                            topology=f'1x1x{target.num_devices}')
  devices = tuple(topology.devices)
  if len(devices) != target.num_devices:
    raise TargetError(f'--target={target.name}: expected {target.num_devices} devices, the topology has '
                      f'{len(devices)}')
  return devices
