"""Measure a trained workdir: perplexity on a split and, with a task file, BLEU and ROUGE of generations.

  python -m llm_jax.evaluate --workdir=DIR [--split=validation] [--task_file=F.jsonl] [--config.eval.steps=50 ...]

  perplexity   mean token loss (nats) over the first `eval.steps` batches of the split, its exp, and bits per
               byte = total loss / ln 2 / UTF-8 bytes of the scored target tokens (so tokenizers compare);
               bits per byte needs the workdir's tokenizer and a causal model (null otherwise)
  tasks        greedy completions (eval.max_new_tokens) of each {"prompt", "reference"} record of the task file,
               scored with sacrebleu BLEU and rouge-score ROUGE-1/2/L F1 (llm_jax.text_metrics; all 0..100)

The config is the workdir's config.json with the --config.x=y overrides laid over it (fields that fix the
checkpoint's shapes cannot change). The newest intact checkpoint is evaluated (a damaged newer one is skipped
with a one-line warning), or --step's. The result is printed as JSON and written atomically to
<workdir>/eval/step_<step>_<split>.json, or to --output. When the workdir cannot be written (a read-only mount,
a full disk) the result is still printed, after one warning line; `output` is then null. `run()` does the work
and is what tests call.
"""

from __future__ import annotations

import math
from typing import Any

from llm_jax import config as config_lib
from llm_jax import storage
from llm_jax import serving
from llm_jax.errors import UserError
from llm_jax import cli
from llm_jax import text_metrics


class OutputError(UserError, OSError):
  """--output cannot be written; the message names the file."""


# config.model fields that fix parameter shapes or layout: a checkpoint cannot be evaluated with other values.


def apply_overrides(config, overrides: dict[str, Any]):
  """Sets dotted `section.field` overrides on `config` (in place), refusing the fields that fix the shapes."""
  for key, value in overrides.items():
    section, _, field = key.partition('.')
    if section == 'model' and field in config_lib.SHAPE_FIELDS and value != config.model[field]:
      raise config_lib.ConfigError(f'config.{key}: cannot change to {value!r}; the checkpoint was trained with '
                                   f'{config.model[field]!r}')
    node = config
    *parents, last = key.split('.')
    for name in parents:
      node = node[name]
    node[last] = value
  return config


def token_byte_lengths(tokenizer):
  """[V] int64: UTF-8 bytes each token id spells (byte pieces <0xNN> 1, control and unknown pieces 0).

  Counting per piece, rather than decoding the targets, stays exact where a window cuts a multi-byte character.
  """
  import numpy as np
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(tokenizer.path))
  lengths = np.zeros(sp.vocab_size(), np.int64)
  for i in range(sp.vocab_size()):
    if sp.is_byte(i):
      lengths[i] = 1
    elif not (sp.is_control(i) or sp.is_unknown(i)):
      lengths[i] = len(sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))  # U+2581 stands for a space
  return lengths


def global_sum(value: int) -> int:
  """Sum of an integer over all processes (the value itself with one process)."""
  import jax
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  import numpy as np
  return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def perplexity(loaded, split: str, num_batches: int) -> dict[str, Any]:
  """Loss, perplexity and bits per byte of the loaded checkpoint on `num_batches` batches of `split`."""
  import itertools
  import numpy as np
  runtime = loaded.runtime
  byte_lengths = None
  if loaded.tokenizer is not None and loaded.config.model.objective == 'clm':
    byte_lengths = token_byte_lengths(loaded.tokenizer)
  total_loss, total_tokens, total_bytes = 0.0, 0.0, 0
  for batch in itertools.islice(runtime.iterator(split, 0), num_batches):
    out = runtime.eval_step(loaded.params, runtime.put(batch))  # the LM objective's sums: loss, tokens, correct
    total_loss, total_tokens = total_loss + float(out['loss']), total_tokens + float(out['tokens'])
    if byte_lengths is not None:  # the text the scored targets spell: the loss is spent on exactly these bytes
      targets = np.minimum(np.asarray(batch['targets']), len(byte_lengths) - 1)
      total_bytes += int(np.sum(byte_lengths[targets] * (np.asarray(batch['loss_mask']) > 0)))
  total_bytes = global_sum(total_bytes)  # the loss is over the global batch; the bytes were this process's rows
  if not total_tokens:
    raise config_lib.ConfigError(f'--split {split}: no target tokens in {num_batches} batches')
  loss = total_loss / total_tokens
  return dict(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=int(total_tokens),
              bits_per_byte=total_loss / math.log(2) / total_bytes if total_bytes else None, bytes=total_bytes)


def tasks(loaded, task_file: str) -> dict[str, Any]:
  """Greedy completions of the task file's prompts (through the chat template when the run fine-tuned on
  sft_jsonl), scored against the references; includes a few samples."""
  e = loaded.config.eval
  records = text_metrics.read_tasks(task_file, e.task_max_examples)
  completions = serving.complete_workdir(loaded, [r['prompt'] for r in records], e.max_new_tokens)
  result, samples = text_metrics.score_tasks(records, completions, e.log_samples)
  return dict(result, file=storage.absolute(task_file), samples=samples)


def run(workdir: str, overrides: dict[str, Any] | None = None, split: str | None = None,
        task_file: str | None = None, step: int | None = None, devices=None,
        output: str | None = None) -> dict[str, Any]:
  """Evaluates the workdir's checkpoint; returns the result and writes it to `output` (default
  <workdir>/eval/step_<step>_<split>.json; an unwritable workdir only warns, an unwritable `output` is an error)."""
  from llm_jax import checkpoint, workdir as workdir_lib  # after flag parsing: keeps --help fast
  if not storage.isdir(workdir):
    raise FileNotFoundError(f'--workdir {workdir}: no such directory')
  config = apply_overrides(config_lib.load_workdir_config(workdir), overrides or {})
  split = split or config.data.eval_split
  task_file = config.eval.task_file if task_file is None else task_file
  if task_file and not storage.exists(task_file):
    raise FileNotFoundError(f'--task_file {task_file}: no such file')
  loaded = workdir_lib.load_workdir(workdir, config, step, devices=devices, need_tokenizer=bool(task_file))
  result = dict(workdir=storage.absolute(workdir), step=loaded.step, split=split,
                perplexity=perplexity(loaded, split, config.eval.steps))
  if task_file:
    result['tasks'] = tasks(loaded, task_file)
  path = output or storage.join(workdir, 'eval', f'step_{loaded.step}_{split}.json')
  try:
    storage.makedirs(storage.dirname(storage.absolute(path)))
    storage.write_json(path, result)
  except OSError as e:
    if output:  # asked for by name: not writing it is the job failing
      raise OutputError(f'--output {output}: cannot write it ({e.strerror or e})') from e
    checkpoint.warn(f'cannot write {path} ({e.strerror or e}); the result is printed only (--output=FILE '
                    f'writes it elsewhere)')
    path = None
  result['output'] = path
  return result


def _main():
  """The command line. Flags are defined here, not at import, so that tests can import every job together."""
  import json

  from absl import app, flags
  from ml_collections import config_flags


  workdir = flags.DEFINE_string('workdir', None, 'Training workdir whose checkpoint is evaluated.')
  config = cli.define_config_dict('config', config_lib.get_config(), 'Overrides of the workdir\'s config, '
                                   'e.g. --config.eval.steps=50 (only the fields given change).')
  split = flags.DEFINE_string('split', None, 'Split to measure perplexity on (default: config.data.eval_split).')
  task_file = flags.DEFINE_string('task_file', None, 'JSONL of {"prompt", "reference"} records to complete and '
                                  'score (default: config.eval.task_file; "" = none).')
  step = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the newest intact one).')
  output = flags.DEFINE_string('output', None, 'JSON file for the result (default: '
                               '<workdir>/eval/step_<step>_<split>.json; printed only if that cannot be written).')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not workdir.value:
      raise app.UsageError('--workdir is required')
    result = run(workdir.value, config_flags.get_override_values(flags.FLAGS[config.name]), split.value,
                 task_file.value, step.value, output=output.value)
    print(json.dumps(result, indent=2, sort_keys=True))

  cli.run(main)


if __name__ == '__main__':
  _main()
