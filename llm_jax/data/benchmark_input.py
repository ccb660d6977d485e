"""Input throughput: how fast preparation reads text, and how many tokens/s one process's iterator delivers.

    python -m llm_jax.data.benchmark_input --config=experiments/tiny.py --workdir=/tmp/bench \\
        [--fresh] [--steps=500] [--process_count=1] [--config.data.global_batch_size=64 --config.data.seq_len=1024]
    python -m llm_jax.data.benchmark_input --config=experiments/tiny.py --workdir=/tmp/bench --prepare_only \\
        --workers=1,2


Prints one JSON line: prepare MB/s of input text (of a fresh build with --fresh, else of the build that made the
prepared data) and iterator tokens/s of process 0 of --process_count (inputs tokens, batch rows x seq_len),
timed over --steps batches after a warm-up, consumed as fast as possible. With --prepare_only --workers=1,2: prepare
MB/s of fresh builds with each config.data.prepare_workers value (the output is the same for all of them), with
a tokenizer trained once before the timed builds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from llm_jax import data
from llm_jax.data import preparation

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Workdir whose prepared data is read (made when missing).')
flags.DEFINE_bool('fresh', False, 'Time a fresh preparation into a temporary directory first.')
flags.DEFINE_integer('steps', 500, 'Batches timed.')
flags.DEFINE_integer('warmup', 20, 'Batches read before timing starts.')
flags.DEFINE_integer('process_count', 1, 'Processes the global batch is split over; process 0 is timed.')
flags.DEFINE_list('workers', [], 'With --prepare_only: time a fresh preparation with each of these '
                  'config.data.prepare_workers values, e.g. 1,2.')
flags.DEFINE_bool('prepare_only', False, 'Time fresh preparations only (no iterator); see --workers.')
flags.mark_flags_as_required(['config', 'workdir'])


def time_fresh_preparation(config) -> dict:
  """Builds the config's prepared data from scratch in a temporary directory; returns its index."""
  scratch = tempfile.mkdtemp(prefix='prepare-benchmark-')
  try:
    fresh = config.copy_and_resolve_references()
    fresh.data.prepared_dir = os.path.join(scratch, 'data')
    return preparation.prepare(fresh, None, progress=False)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def time_iterator(config, workdir: str, steps: int, warmup: int, process_count: int) -> float:
  """Tokens/s delivered by process 0's training iterator."""
  iterator = data.make_iterator(config, 'train', 0, 0, process_count, workdir)
  for _ in range(warmup):
    next(iterator)
  started = time.perf_counter()
  tokens = 0
  for _ in range(steps):
    tokens += next(iterator)['inputs'].size
  return tokens / (time.perf_counter() - started)


def time_workers(config, workers: list[int]) -> dict:
  """Prepare MB/s of fresh builds with each worker count, and the speed-up over the first. The tokenizer is
  trained once beforehand and given to every timed build (its training is serial and the same for all)."""
  result = {'source': config.data.source, 'cores': os.cpu_count()}
  scratch = tempfile.mkdtemp(prefix='prepare-workers-')
  try:
    first = config.copy_and_resolve_references()
    first.data.prepared_dir = os.path.join(scratch, 'first')
    index = preparation.prepare(first, None, progress=False)
    result['input_mb'] = round(sum(s['input_chars'] for s in index['splits'].values()) / 1e6, 2)
    tokenizer_file = index['tokenizer']['file']
    for count in workers:
      fresh = config.copy_and_resolve_references()
      fresh.data.prepare_workers = count
      fresh.data.tokenizer_path = os.path.join(scratch, 'first', tokenizer_file)
      index = time_fresh_preparation(fresh)
      result[f'prepare_mb_per_s_workers_{count}'] = round(index['input_mb_per_s'], 3)
      result[f'prepare_seconds_workers_{count}'] = round(index['seconds'], 2)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  base = result[f'prepare_mb_per_s_workers_{workers[0]}']
  for count in workers[1:]:
    result[f'speedup_workers_{count}'] = round(result[f'prepare_mb_per_s_workers_{count}'] / base, 2)
  return result


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if flags.FLAGS.prepare_only:
    print(json.dumps(time_workers(config, [int(w) for w in flags.FLAGS.workers or ['1']])))
    return
  result = {'source': config.data.source, 'seq_len': config.data.seq_len,
            'global_batch_size': config.data.global_batch_size, 'process_count': flags.FLAGS.process_count}
  if flags.FLAGS.fresh:
    fresh = time_fresh_preparation(config)
    result.update(prepare_seconds=round(fresh['seconds'], 2), prepare_mb_per_s=round(fresh['input_mb_per_s'], 2))
  index = preparation.prepare(config, workdir, progress=False)
  if not flags.FLAGS.fresh:
    result.update(prepare_seconds=round(index['seconds'], 2), prepare_mb_per_s=round(index['input_mb_per_s'], 2))
  result['train_tokens'] = index['splits']['train']['num_tokens']
  tokens_per_s = time_iterator(config, workdir, flags.FLAGS.steps, flags.FLAGS.warmup, flags.FLAGS.process_count)
  result['iterator_tokens_per_s_per_process'] = round(tokens_per_s)
  print(json.dumps(result))


if __name__ == '__main__':
  from llm_jax import cli
  cli.run(main)
