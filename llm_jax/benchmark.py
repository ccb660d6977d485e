"""Training throughput: `python -m llm_jax.benchmark --config=experiments/1b.py [--config.a.b=v ...]`.

Builds the real `Trainer` (same mesh, model, optimizer, shardings and donated `train_step` as training) on the
synthetic source, runs `--warmup` steps (the first one compiles), then `--steps` timed steps, each
synchronised with `jax.block_until_ready` on the new state and metrics. Prints one JSON line on stdout:

  tokens_per_s, mfu (null where the device peak is unknown, e.g. CPU), step_time_s {median, mean, min, max},
  peak_memory_gb (device.memory_stats() peak, null where the backend has none, e.g. CPU), params (eval_shape
  count: every expert of a mixture), active_matmul_params (the weights a token multiplies: metrics.matmul_params,
  k experts of a mixture), flops_per_token (metrics.flops_per_token), device_kind, num_devices, input mode, config summary.

Input modes (`--input`), so host data time can be kept out of the figure or measured:
  pregenerated  (default) `--num_batches` distinct batches are generated and put on the devices before timing,
                and reused in turn: no host work is timed.
  prefetch      a background thread generates each batch and puts it on the devices, two steps ahead.
  inline        generated and put in the loop, as a naive trainer would (to see what prefetch buys).

tokens_per_s = global_batch_size * seq_len * steps / (sum of the timed step times); MFU uses the same
FLOPs-per-token convention as training and the peer benchmark (metrics.py docstring).
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import threading
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from llm_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (experiments/*.py).',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps before timing; the first one compiles.')
_INPUT = flags.DEFINE_enum('input', 'pregenerated', ['pregenerated', 'prefetch', 'inline'],
                           'How batches reach the devices (module docstring).')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 4, 'Distinct batches pre-generated for --input=pregenerated.')
_DONATE = flags.DEFINE_bool('donate', True, 'Donate the state to the step (as training does); '
                            '--nodonate measures what donation saves.')
_XLA_FLAGS = flags.DEFINE_string('xla_flags', '', 'Extra XLA flags appended to $XLA_FLAGS before the backend '
                                 'starts, e.g. --xla_gpu_enable_latency_hiding_scheduler=true.')
_ONE_DOCUMENT = flags.DEFINE_bool('one_document', False, 'Every row one document (segment 1, positions 0..T-1), as '
                                   'the peer benchmark trains: attention takes the plain causal path.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'If set, the result is also appended to <workdir>/benchmark.jsonl '
                               '(and --config.train.profile_steps traces go to <workdir>/profile/).')


def _peak_memory_gb(devices) -> float | None:
  """Largest peak_bytes_in_use over the devices, in GiB; None where the backend keeps no statistics."""
  peaks = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(stats['peak_bytes_in_use'])
  return max(peaks) / 1024 ** 3 if peaks else None


class _Prefetcher:
  """A background thread that makes batch k and puts it on the devices, `depth` batches ahead."""

  def __init__(self, make, put, depth: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._make, self._put = make, put
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    step = 0
    while not self._stop.is_set():
      item = self._put(self._make(step))
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      step += 1

  def next(self):
    return self._queue.get()

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)


def _one_document(batch):
  """The same tokens, as one document per row (no packing): what a benchmark without packing trains on."""
  import numpy as np
  rows, length = batch['inputs'].shape
  return dict(batch, segment_ids=np.ones((rows, length), np.int32),
              positions=np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
              loss_mask=np.ones((rows, length), np.float32))


def run(config, steps: int = 20, warmup: int = 3, input_mode: str = 'pregenerated', num_batches: int = 4,
        donate: bool = True, devices=None, one_document: bool = False, profile_dir: str | None = None
        ) -> dict[str, Any]:
  """Benchmarks the train step of `config` on the synthetic source; returns the result row.

  config.train.profile_steps (1-based over warm-up and timed steps together) writes a profiler trace to
  `profile_dir`; the traced steps run slower, so profile in a run whose figure you do not report.
  """
  import jax

  from llm_jax import dry_run
  from llm_jax import metrics as metrics_lib
  from llm_jax import profiling
  from llm_jax import sharding
  from llm_jax import train
  from llm_jax.data import synthetic

  if steps <= 0 or warmup < 1:
    raise ValueError(f'need steps >= 1 and warmup >= 1 (the first step compiles), got {steps=}, {warmup=}')
  config = config.copy_and_resolve_references()
  config.data.source = 'synthetic'  # the benchmark measures the step, not a data pipeline
  window = profiling.ProfileWindow.from_config(config, profile_dir) if profile_dir else None
  if window is None and profiling.parse_steps(config.train.profile_steps):
    from llm_jax.errors import ConfigError
    raise ConfigError('config.train.profile_steps: the benchmark writes the trace to <workdir>/profile: pass --workdir')
  trainer = train.Trainer(config, workdir='', devices=devices)
  step_fn = trainer.train_step
  if not donate:
    step_fn = jax.jit(train.make_train_step(config, trainer.model, trainer.optimizer, trainer.mesh),
                      in_shardings=(trainer.state_shardings, trainer.batch_sharding),
                      out_shardings=(trainer.state_shardings, sharding.replicated(trainer.mesh)),
                      compiler_options=trainer.compiler_options)

  make = lambda k: synthetic.make_batch(config, 'train', k, jax.process_index(), jax.process_count())
  if one_document:
    make = lambda k, make=make: _one_document(make(k))
  prefetcher = None
  if input_mode == 'pregenerated':
    cached = [trainer.put(make(k)) for k in range(max(1, num_batches))]
    next_batch = lambda k: cached[k % len(cached)]
  elif input_mode == 'prefetch':
    prefetcher = _Prefetcher(make, trainer.put)
    next_batch = lambda k: prefetcher.next()
  elif input_mode == 'inline':
    next_batch = lambda k: trainer.put(make(k))
  else:
    raise ValueError(f'unknown input mode {input_mode!r}; expected pregenerated, prefetch or inline')

  try:
    state = trainer.fresh_state()
    compile_start = time.perf_counter()
    times = []
    for k in range(warmup + steps):
      start = time.perf_counter()
      state, step_metrics = step_fn(state, next_batch(k))
      jax.block_until_ready((state, step_metrics))
      if k == 0:
        first_step_s = time.perf_counter() - compile_start
      elif k >= warmup:
        times.append(time.perf_counter() - start)
      if window is not None:
        window.after_step(k + 1, (state, step_metrics))
    loss = float(jax.device_get(step_metrics['loss']))
  finally:
    if prefetcher is not None:
      prefetcher.close()
    if window is not None:
      window.close()

  num_devices = trainer.mesh.size
  device_kind = trainer.mesh.devices.flat[0].device_kind
  tokens_per_step = config.data.global_batch_size * config.data.seq_len
  tokens_per_s = tokens_per_step * steps / sum(times)
  flops_per_token = metrics_lib.flops_per_token(config.model, config.data.seq_len)
  params = sum(x.size for x in jax.tree.leaves(train.abstract_params(config, trainer.model)))
  return dict(
      tokens_per_s=tokens_per_s,
      mfu=metrics_lib.mfu(tokens_per_s, flops_per_token, num_devices, device_kind),
      step_time_s=dict(median=statistics.median(times), mean=statistics.fmean(times), min=min(times),
                       max=max(times)),
      peak_memory_gb=_peak_memory_gb(trainer.mesh.devices.flat),
      params=params,
      active_matmul_params=metrics_lib.matmul_params(config.model),
      flops_per_token=flops_per_token,
      device_kind=device_kind,
      platform=trainer.mesh.devices.flat[0].platform,
      num_devices=num_devices,
      tokens_per_step=tokens_per_step,
      steps=steps,
      warmup=warmup,
      first_step_s=first_step_s,
      final_loss=loss,
      input=input_mode,
      donate=donate,
      one_document=one_document,
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      xla_options=config.xla.options,
      gpu_memory_fraction=os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'),
      jax_version=jax.__version__,
      config=dry_run.summary(config),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=experiments/1b.py')
  from llm_jax import xla_options
  xla_options.apply_memory_fraction(config)  # as training does, before the first jax call starts the backend
  if _XLA_FLAGS.value:  # before the first jax call starts the backend
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _XLA_FLAGS.value).strip()
  if _STEPS.value < 1 or _WARMUP.value < 1:
    raise app.UsageError('--steps and --warmup must be >= 1 (the first warm-up step compiles)')
  from llm_jax import storage
  result = run(config, _STEPS.value, _WARMUP.value, _INPUT.value, _NUM_BATCHES.value, _DONATE.value,
               one_document=_ONE_DOCUMENT.value,
               profile_dir=storage.join(_WORKDIR.value, 'profile') if _WORKDIR.value else None)
  line = json.dumps(result)
  if _WORKDIR.value:
    storage.append_text(storage.join(_WORKDIR.value, 'benchmark.jsonl'), line + '\n')
  print(line, flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run(main)
