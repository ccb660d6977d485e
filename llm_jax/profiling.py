"""A profiler window over a few train steps: config.train.profile_steps = 'FIRST,LAST' (1-based step numbers, as
in metrics.jsonl) writes one jax.profiler trace of steps FIRST..LAST into a directory (training and the
benchmark: <workdir>/profile/), readable by TensorBoard's profile plugin and by Perfetto (the .trace.json.gz).

  window = ProfileWindow.from_config(config, logdir)   # None when profile_steps is ''
  window.after_step(n, outputs)   # after step n: starts the trace when n == FIRST-1, stops it when n == LAST
  window.close()                  # stops a trace a short run left open

One call after each step is all it needs, so it fits a loop whose periodic actions run after the step (the train
loop's hooks). Steps are dispatched asynchronously, so the window waits for step n's outputs before starting or
stopping: the trace then holds the device work of exactly steps FIRST..LAST. Step 1 compiles, so FIRST >= 2.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

from llm_jax import storage
from llm_jax.errors import ConfigError


def parse_steps(spec: str) -> tuple[int, int] | None:
  """'5,8' -> (5, 8); '7' -> (7, 7); '' -> None. Raises ConfigError naming config.train.profile_steps."""
  if not spec.strip():
    return None
  parts = [p.strip() for p in spec.split(',')]
  try:
    first, last = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
  except ValueError:
    first = last = None
  if first is None or first < 2 or last < first:
    raise ConfigError(f"config.train.profile_steps: {spec!r} is not 'FIRST,LAST' with 2 <= FIRST <= LAST "
                      f"(1-based step numbers, e.g. '5,8'; step 1 compiles)")
  return first, last


class ProfileWindow:
  """Traces steps first..last (1-based) into `logdir`."""

  def __init__(self, first: int, last: int, logdir: str):
    self.first, self.last, self.logdir = first, last, logdir
    self.active = False

  @classmethod
  def from_config(cls, config, logdir: str) -> 'ProfileWindow | None':
    steps = parse_steps(config.train.profile_steps)
    return cls(*steps, logdir) if steps else None

  def due(self, step: int) -> bool:
    """Whether after_step(step) has anything to do (the train loop asks before calling it)."""
    return step == self.first - 1 or (self.active and step >= self.last)

  def after_step(self, step: int, outputs=None) -> None:
    if step == self.first - 1 and not self.active:
      jax.block_until_ready(outputs)  # earlier steps stay out of the trace
      # a bucket logdir: trace into a local directory, uploaded by close() (the profiler writes local files)
      self._local = tempfile.mkdtemp(prefix='llm_jax-profile-') if storage.is_url(self.logdir) else self.logdir
      os.makedirs(self._local, exist_ok=True)
      jax.profiler.start_trace(self._local, create_perfetto_trace=True)  # also a .trace.json.gz for Perfetto
      self.active = True
    elif self.active and step >= self.last:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      if self._local != self.logdir:
        storage.upload_dir(self._local, self.logdir)
        shutil.rmtree(self._local, ignore_errors=True)
      print(f'profile of steps {self.first}-{self.last} written to {self.logdir}', flush=True)
