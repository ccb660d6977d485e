"""Compile the serving engine's decode and prefill steps for a config and a target, without the hardware:

  python -m llm_jax.serve_dry_run --config=experiments/llama3_8b.py --target=v5e-8 \
      --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 --config.mesh.fsdp=1 --config.mesh.tensor=-1

Prints memory per device, the pages that fit and the attention kernel in each compiled step
(llm_jax/serving/aot.py), then one JSON line with every figure.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from llm_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (experiments/*.py).',
                                          lock_config=True)
_TARGET = flags.DEFINE_string('target', None, 'Compile for this hardware instead of this host\'s devices: a TPU '
                              'slice (v5e-8, v5p-8, ...) or a GPU node (h100, h200x8, ...); see llm_jax/targets.py.')
_ROWS = flags.DEFINE_integer('rows', 32, 'Rows of the decode bucket (EngineConfig.max_seqs).')
_PREFILL = flags.DEFINE_integer('prefill', 512, 'Tokens of the prefill bucket (one sequence).')
_PAGE_SIZE = flags.DEFINE_integer('page_size', 16, 'Tokens a page (EngineConfig.page_size).')
_MAX_MODEL_LEN = flags.DEFINE_integer('max_model_len', 0, 'Context of a sequence; 0 = config.data.seq_len.')
_ATTENTION = flags.DEFINE_string('attention', 'auto', 'Paged kernel (EngineConfig.attention): auto, xla, ragged.')
_NUM_PAGES = flags.DEFINE_integer('num_pages', 0, 'Pages of the compiled pool; 0 = rows full-length sequences, '
                                  'capped by what the target\'s memory leaves beside the weights.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from llm_jax.serving import aot  # after flag parsing: keeps --help fast
  result = aot.analyze(_CONFIG.value, target=_TARGET.value, rows=_ROWS.value, prefill=_PREFILL.value,
                       page_size=_PAGE_SIZE.value, max_model_len=_MAX_MODEL_LEN.value,
                       attention_name=_ATTENTION.value, num_pages=_NUM_PAGES.value)
  print(aot.format_report(result))
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run(main)
