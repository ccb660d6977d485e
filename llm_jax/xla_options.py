"""XLA settings from the config (config.xla), applied the same way by training and the benchmark.

  compiler_options(config)    config.xla.options as the `compiler_options` of the train and eval steps' jax.jit
  apply_memory_fraction(config)  config.xla.gpu_memory_fraction into XLA_PYTHON_CLIENT_MEM_FRACTION

Compiler options go per jit, not into XLA_FLAGS: they then belong to the config (written to config.json, shown in
the benchmark's JSON line), reach exactly the steps the Trainer compiles whoever builds it (training, benchmark,
dry run, tests), and do not depend on being set before the backend starts. XLA_FLAGS (or the benchmark's
--xla_flags) stays for process-wide flags. The memory fraction is a client setting read when the GPU backend
starts, so it can only be an environment variable, set by the entry points (main, benchmark) before any jax call.
"""

from __future__ import annotations

import os

from llm_jax.errors import ConfigError

_TRUE, _FALSE = ('true', 'True', '1'), ('false', 'False', '0')


def parse_options(text: str) -> dict[str, str | bool]:
  """'--xla_a=true xla_b=FUSION,CUBLAS xla_c=' -> {'xla_a': True, 'xla_b': 'FUSION,CUBLAS', 'xla_c': ''}.

  The syntax of XLA_FLAGS (whitespace-separated name=value, the leading '--' optional), so flags can be pasted.
  """
  options = {}
  for item in text.split():
    name, sep, value = item.lstrip('-').partition('=')
    if not sep or not name.startswith('xla_'):
      raise ConfigError(f'config.xla.options: {item!r} is not of the form xla_name=value')
    options[name] = True if value in _TRUE else False if value in _FALSE else value
  return options


def compiler_options(config) -> dict[str, str | bool] | None:
  """The `compiler_options` for jax.jit of the steps (None when config.xla.options is empty)."""
  return parse_options(config.xla.options) or None


def apply_memory_fraction(config) -> None:
  """Sets XLA_PYTHON_CLIENT_MEM_FRACTION (only effective before the GPU backend starts; 0 = leave JAX's 75%)."""
  fraction = config.xla.gpu_memory_fraction
  if fraction:
    os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'] = str(fraction)
