"""FLOPs per token, MFU, and the writers of metrics (metrics.jsonl, TensorBoard, stdout).

FLOPs convention (the one MaxText, PaLM and the peer benchmark use): per trained token,

  6 * N_matmul  +  6 * num_layers * d_model * seq_len   (causal)
                   12 * num_layers * d_model * seq_len  (bidirectional, objective='mlm')

N_matmul counts every weight that takes part in a matmul: the blocks' projections and the output projection
(lm_head, or the tied embedding used as one); the input embedding is a gather and is not counted, nor are the
norm scales. A mixture of experts counts its active weights (router, the k experts a token is routed to, the
shared expert): the FLOPs a token costs, not the parameters the model stores (total_params). The attention term is QK^T and PV: 2 matmuls * 2 FLOPs * seq * d_model per token and layer in the
forward pass, times 3 for forward + backward, halved when causal. Rematerialised recomputation is NOT counted:
MFU measures useful work, so remat lowers it honestly.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
from llm_jax import storage
from llm_jax.model import head_dim_of

# Peak dense bf16 FLOP/s per device, from the vendors' data sheets. Unknown kinds (CPUs) have no peak, and
# their MFU is reported as null rather than a made-up number.
PEAK_BF16_FLOPS = {
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
    'NVIDIA A100 80GB PCIe': 312e12,
    'NVIDIA L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
}


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
  """Peak bf16 FLOP/s of one device, matched by the longest table key that prefixes its kind; None if unknown."""
  kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
  matches = [key for key in PEAK_BF16_FLOPS if kind.startswith(key)]
  return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def _ffn_params(m, experts: int) -> int:
  """One layer's FFN weights with `experts` routed experts counted: the SwiGLU, or the router, the experts and
  a gated shared expert (ffn=moe)."""
  if m.get('ffn', 'dense') != 'moe':
    return 3 * m.d_model * m.ffn_dim
  shared = 3 * m.d_model * m.shared_expert_ffn_dim + m.d_model if m.shared_expert_ffn_dim else 0  # + its gate
  return m.d_model * m.num_experts + experts * 3 * m.d_model * (m.expert_ffn_dim or m.ffn_dim) + shared


def matmul_params(model_config) -> int:
  """Weights used in matmuls (see the module docstring), from the config alone. A mixture of experts counts the
  weights each token multiplies: the router, its experts_per_token experts and the shared expert."""
  m = model_config
  head_dim = head_dim_of(m)
  attention = m.d_model * head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)  # q, o; k, v
  mlp = _ffn_params(m, m.get('experts_per_token', 0))
  return m.num_layers * (attention + mlp) + m.vocab_size * m.d_model  # + output projection


def total_params(model_config) -> int:
  """All parameters: matmul weights (every expert), the input embedding (unless tied), the norm scales, q/k/v
  biases and q/k norms."""
  m = model_config
  embedding = 0 if m.tie_embeddings else m.vocab_size * m.d_model
  norms = ((4 if m.get('post_norms', False) else 2) * m.num_layers + 1) * m.d_model  # + Gemma's sandwich norms
  head_dim = head_dim_of(m)
  biases = m.num_layers * (m.num_heads + 2 * m.num_kv_heads) * head_dim if m.qkv_bias else 0
  qk_norms = m.num_layers * (m.num_heads + m.num_kv_heads) * head_dim if m.get('qk_norm', False) else 0
  qk_norms += m.num_layers * 2 * head_dim if m.get('qk_norm_per_head', False) else 0  # one [H] scale each
  idle_experts = m.num_layers * (_ffn_params(m, m.num_experts) - _ffn_params(m, m.experts_per_token)) \
      if m.get('ffn', 'dense') == 'moe' else 0
  return matmul_params(m) + embedding + norms + biases + qk_norms + idle_experts


def flops_per_token(model_config, seq_len: int) -> float:
  """Training FLOPs per token, forward + backward (module docstring)."""
  m = model_config
  from llm_jax import objectives  # pylint: disable=g-import-not-at-top  (metrics is imported by data tools)
  attention_factor = 6 if objectives.REGISTRY[m.objective].causal else 12
  return 6 * matmul_params(m) + attention_factor * m.num_layers * m.num_heads * head_dim_of(m) * seq_len


def mfu(tokens_per_s: float, flops_per_tok: float, num_devices: int, device_kind: str | None = None):
  """Model FLOPs utilisation in [0, 1], or None on devices with no known peak."""
  peak = peak_flops_per_device(device_kind)
  if peak is None:
    return None
  return tokens_per_s * flops_per_tok / (peak * num_devices)


class _ObjectJsonl:
  """metrics.jsonl on an object store, which cannot append: the rows (after the existing object's) are kept in
  memory, and `flush` re-uploads the whole object in one atomic PUT."""

  def __init__(self, path: str):
    self.path = path
    self._text = storage.read_text(path) if storage.exists(path) else ''
    self._dirty = False

  def write(self, line: str) -> None:
    self._text += line
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      storage.write_text(self.path, self._text)
      self._dirty = False

  def close(self) -> None:
    self.flush()


def drop_rows_after(path: str, step: int) -> int:
  """Rewrites a metrics.jsonl without its rows beyond `step` (atomically); returns how many were dropped.

  A run restarted from step k (its checkpoint) repeats steps k+1, ...: the interrupted run's rows for them would
  otherwise stand twice, or alone where the resumed run logs at other steps. A partial last line (a crash while
  writing it) goes too; any other line that is not JSON is kept as it is, for plot to name.
  """
  if not storage.exists(path):
    return 0
  lines = storage.read_text(path).splitlines()
  kept = []
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
    except ValueError:
      if i < len(lines) - 1:
        kept.append(line)
      continue
    if not (isinstance(row, dict) and isinstance(row.get('step'), (int, float)) and row['step'] > step):
      kept.append(line)
  dropped = len(lines) - len(kept)
  if dropped:
    storage.write_text(path, ''.join(line + '\n' for line in kept))  # atomic: rename locally, one PUT on a bucket
  return dropped


class MetricsWriter:
  """Appends rows to <workdir>/metrics.jsonl, mirrors scalars to TensorBoard and prints a readable line.

  Only process 0 writes; other processes get a writer that does nothing. On a gs:// / s3:// workdir,
  metrics.jsonl is re-uploaded whole (at most every `flush_every_s` s, and on close), and the TensorBoard events
  are written to a local temporary directory and uploaded to <workdir>/tensorboard/ at the same times:
  tensorboardX's own gs:// support needs TensorFlow, which the GPU image lacks.

  `start_step`: the step the run starts from (its restored checkpoint, 0 when fresh). Rows of an earlier run
  beyond it are dropped from metrics.jsonl (`drop_rows_after`) and TensorBoard events beyond it are purged
  (tensorboardX's purge_step), so readers see the rows of an uninterrupted run.
  """

  def __init__(self, workdir: str, enabled: bool = True, stream=sys.stdout, flush_every_s: float = 30.0,
               start_step: int | None = None):
    self.enabled = enabled
    self.stream = stream
    self._tb = None
    self._jsonl = None
    self._tb_local = self._tb_remote = None
    self._flush_every_s, self._last_upload = flush_every_s, time.monotonic()
    if not enabled:
      return
    path = storage.join(workdir, 'metrics.jsonl')
    if start_step is not None:
      drop_rows_after(path, start_step)
    if storage.is_url(workdir):
      self._jsonl = _ObjectJsonl(path)
      self._tb_remote = storage.join(workdir, 'tensorboard')
      self._tb_local = tempfile.mkdtemp(prefix='llm_jax-tensorboard-')
    else:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(path, 'a', buffering=1)
    try:  # TensorBoard is optional: tensorboardX is pure Python, but an image may lack it
      from tensorboardX import SummaryWriter
      # purge_step: TensorBoard hides the events at or beyond it that earlier event files hold (written by a run
      # that went further before it was interrupted).
      tb_dir = storage.join(workdir, 'tensorboard')
      earlier = start_step is not None and storage.isdir(tb_dir) and storage.listdir(tb_dir)
      self._tb = SummaryWriter(self._tb_local or tb_dir, purge_step=start_step + 1 if earlier else None)
    except ImportError:
      print('tensorboardX is not installed: no TensorBoard events (metrics.jsonl is still written)', file=stream)

  def _upload(self) -> None:
    """Object-store workdir: re-uploads metrics.jsonl and the TensorBoard event files."""
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
      storage.upload_dir(self._tb_local, self._tb_remote)
    self._last_upload = time.monotonic()

  def write(self, row: dict[str, Any], echo: bool = True) -> None:
    if not self.enabled:
      return
    row = {k: _plain(v) for k, v in row.items()}
    self._jsonl.write(json.dumps(row) + '\n')
    step = int(row.get('step', 0))
    if self._tb is not None:
      for key, value in row.items():
        if key != 'step' and isinstance(value, (int, float)) and value is not None:
          self._tb.add_scalar(key, value, step)
    if self._tb_local is not None and time.monotonic() - self._last_upload >= self._flush_every_s:
      self._upload()
    if echo:
      print(format_row(row), file=self.stream, flush=True)

  def write_text(self, tag: str, text: str, step: int) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, step)

  def close(self) -> None:
    if self._tb_local is not None:
      self._upload()
      shutil.rmtree(self._tb_local, ignore_errors=True)
      self._tb_local = None
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  """JSON-friendly scalars (numpy/jax scalars -> Python)."""
  if hasattr(value, 'item'):
    return value.item()
  return value


def format_row(row: dict[str, Any]) -> str:
  parts = [f'step {row.get("step")}']
  for key, value in row.items():
    if key == 'step' or value is None:
      continue
    if isinstance(value, float):
      parts.append(f'{key} {value:.4g}')
    elif isinstance(value, (int, str)):
      parts.append(f'{key} {value}')
  return time.strftime('%H:%M:%S ') + ' | '.join(parts)
