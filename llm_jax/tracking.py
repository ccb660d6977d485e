"""Weights & Biases tracking: the metrics rows of a run mirrored to W&B, beside metrics.jsonl and TensorBoard.

  wrap(writer, config, workdir) -> the writer itself (tracking off) or a WandbWriter around it

Off unless config.tracking.wandb_project is set; wandb is imported only then (pip extra `tracking`), so a run
without tracking never imports it. The W&B run gets the whole config; each metrics row is logged at its step
(scalars as charts, the generation tasks' samples as a table); the run's id is kept in <workdir>/wandb_run_id,
so a resumed run continues the same W&B run. config.tracking.wandb_mode=offline writes the run under $WANDB_DIR
(or the current directory) without sending anything (`wandb sync` uploads it later); disabled logs nothing.
Only process 0 tracks.
"""

from __future__ import annotations

import uuid
from typing import Any

from llm_jax import storage

RUN_ID_FILE = 'wandb_run_id'


class WandbWriter:
  """A MetricsWriter that also logs every row to a W&B run (same interface: write, write_text, close)."""

  def __init__(self, inner, run):
    self.inner, self.run = inner, run
    self.enabled = inner.enabled

  def write(self, row: dict[str, Any], echo: bool = True) -> None:
    self.inner.write(row, echo)
    import wandb
    step = int(row.get('step', 0))
    logged = {}
    for key, value in row.items():
      if key == 'step' or value is None:
        continue
      if hasattr(value, 'item'):
        value = value.item()
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        logged[key] = value
      elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):  # e.g. task_samples
        columns = sorted({k for v in value for k in v})
        logged[key] = wandb.Table(columns=columns, data=[[str(v.get(c, '')) for c in columns] for v in value])
    if logged:
      self.run.log(logged, step=step)

  def write_text(self, tag: str, text: str, step: int) -> None:
    self.inner.write_text(tag, text, step)  # samples reach W&B as the rows' tables

  def close(self) -> None:
    try:
      self.run.finish()
    finally:
      self.inner.close()

  def __getattr__(self, name):  # anything else a MetricsWriter offers
    return getattr(self.inner, name)


def _run_id(workdir: str) -> str:
  """The W&B run id of this workdir: made once, then read back on every resume."""
  path = storage.join(workdir, RUN_ID_FILE)
  if storage.exists(path):
    return storage.read_text(path).strip()
  run_id = uuid.uuid4().hex[:16]
  storage.write_text(path, run_id + '\n')
  return run_id


def wrap(writer, config, workdir: str):
  """`writer` mirrored to W&B when config.tracking.wandb_project is set (and this process writes), else as is."""
  t = config.tracking
  if not t.wandb_project or not writer.enabled or t.wandb_mode == 'disabled':
    return writer
  import wandb  # only here: tracking is optional
  run = wandb.init(project=t.wandb_project, entity=t.wandb_entity or None,
                   name=t.wandb_run_name or storage.basename(workdir.rstrip('/')), mode=t.wandb_mode,
                   id=_run_id(workdir), resume='allow', config=config.to_dict(), reinit='create_new')
  return WandbWriter(writer, run)
