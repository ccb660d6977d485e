"""Test set-up: 8 fake CPU devices (so meshes can be tested on one machine), quiet logs, one compilation cache."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

# One persistent compilation cache for the whole run, shared by the xdist workers and the subprocesses tests start
# (they inherit the environment): many tests compile the same tiny steps. A fresh directory per run, made by the
# first process (the xdist controller, which starts the workers after loading this file), removed at its exit.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix='llm_jax_test_compile_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
