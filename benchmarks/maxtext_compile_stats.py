"""MaxText's own train_compile, keeping what our dry run reports: the compiled step's memory (XLA's peak included)
and its optimized HLO text.

Runs in MaxText's venv (Python 3.12, `pip install "maxtext[tpu]==0.2.5"`); it imports nothing of llm_jax.
train_compile prints `memory_analysis()` without the peak, and can save the compiled object
(`compiled_trainstep_file=PATH`, a pickle): this swaps that save for two files, PATH.json (the memory figures,
peak_memory_in_bytes among them) and PATH.hlo.txt (the HLO that `python -m llm_jax.hlo_analysis` reads beside our
dry run's XLA dump). Every argument is train_compile's, e.g.

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/maxtext_compile_stats.py <maxtext>/configs/base.yml \\
      compile_topology=v5p-8 compile_topology_num_slices=1 model_name=llama2-7b per_device_batch_size=1 \\
      remat_policy=full compiled_trainstep_file=/tmp/maxtext_7b
"""

import json
import os

from absl import app
from maxtext.trainers.pre_train import train_compile

MEMORY_FIELDS = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes', 'temp_size_in_bytes',
                 'generated_code_size_in_bytes', 'peak_memory_in_bytes')


def _write(path: str, text: str) -> None:
  """Write to a temporary name, then rename: nothing half-written is ever taken for complete."""
  with open(f'{path}.tmp', 'w') as f:
    f.write(text)
  os.replace(f'{path}.tmp', path)


def save_stats(compiled, path):
  memory = compiled.memory_analysis()
  _write(f'{path}.json', json.dumps({field: getattr(memory, field, None) for field in MEMORY_FIELDS}))
  _write(f'{path}.hlo.txt', compiled.as_text())
  print(f'memory and HLO of the compiled step: {path}.json, {path}.hlo.txt', flush=True)


if __name__ == '__main__':
  train_compile.save_compiled = save_stats
  app.run(train_compile.main)
