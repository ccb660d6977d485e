"""Compile-only check: will this config fit, and how much work is a step? `python -m llm_jax.main --dry_run`.

Lowers and compiles the real train step (the `Trainer`'s jitted, donated, sharded `train_step`) from abstract
inputs only: `jax.eval_shape` gives the state's shapes, the logical-axis rules give its shardings, and
`jax.ShapeDtypeStruct`s stand in for the state and the batch. Nothing is allocated. The devices are this host's
(a fake CPU mesh works too), or with `--target=NAME` the compile-only devices of a TPU slice or a GPU node that
this machine does not have (llm_jax/targets.py), so a 7B config can be checked for a v5p-8 from a laptop:

  python -m llm_jax.main --config=experiments/7b.py --dry_run --target=v5p-8

Memory comes from XLA's buffer assignment of the compiled step (`compiled.memory_analysis()`), per device:
arguments (state + batch), outputs, temporaries (activations, gradients, workspace), generated code; donated
arguments alias outputs and are counted once. For a target they are the target compiler's own figures; a CPU
compile of a GPU config only estimates them (the argument and output sizes are exact, temporaries indicative).
FLOPs, attention kernels and collectives are read from the compiled HLO (llm_jax/hlo_analysis.py: every loop
iteration counted, unlike XLA's cost analysis, which counts a scanned layer once), beside the model FLOPs from
`metrics.flops_per_token`.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax import hlo_analysis
from llm_jax import metrics as metrics_lib
from llm_jax import objectives
from llm_jax import sharding
from llm_jax import targets as targets_lib
from llm_jax import train
from llm_jax.errors import UserError
from llm_jax.model import attention

GIB = 1024 ** 3

# Usable memory of common devices, for the "fits" lines of the report.
DEVICE_MEMORY_GB = {'H100 80GB': 80.0, 'H200 141GB': 141.0, 'A100 40GB': 40.0, 'TPU v5e 16GB': 16.0}


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch as ShapeDtypeStructs with the trainer's batch sharding (same keys/dtypes as data/)."""
  shape = (config.data.global_batch_size, config.data.seq_len)
  batch_sharding = sharding.batch_sharding(mesh)
  dtypes = dict(inputs=jnp.int32, targets=jnp.int32, segment_ids=jnp.int32, positions=jnp.int32,
                loss_mask=jnp.float32)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, dtype in dtypes.items()}
  # what the objective adds (grpo: the rollout's old log-probs and advantages)
  for name, (rest, dtype) in objectives.REGISTRY[config.model.objective].batch_fields(config).items():
    batch[name] = jax.ShapeDtypeStruct((shape[0],) + tuple(rest), dtype, sharding=batch_sharding)
  return batch


def abstract_state(trainer: train.Trainer) -> train.TrainState:
  """The TrainState as ShapeDtypeStructs carrying the trainer's shardings; allocates nothing."""
  # The Trainer's own (eval_shape of its sharded init): a tree.map over shapes and shardings does not line up
  # through the empty MaskedNode subtrees of a LoRA run's optimizer state.
  return trainer.abstract_state()


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (largest shard, i.e. the first device's)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard_shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0] if cost else {}
  return cost or {}


def analyze(config, devices=None, target: str | None = None) -> dict[str, Any]:
  """Compiles the train step from abstract inputs, for `devices` (default: this host's) or a named target
  (llm_jax.targets: a TPU slice or a GPU node, compiled for without being there); returns per-device memory,
  FLOPs, attention kernels and collectives."""
  t0 = time.perf_counter()
  spec = targets_lib.get(target) if target else None
  if spec is not None:
    devices = spec.devices()
  # Tracing (the abstract init too) asks jax's cuDNN checks about the target's GPUs, not the host's.
  with attention.cudnn_checks_for(devices if devices is not None else jax.devices()):
    trainer = train.Trainer(config, workdir='', devices=devices)
    state = abstract_state(trainer)
    batch = abstract_batch(config, trainer.mesh)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    t1 = time.perf_counter()
    lowered = trainer.train_step.lower(state, batch)
    t2 = time.perf_counter()
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      return _refused(config, trainer, spec, params, str(e), dict(setup=round(t1 - t0, 2), lower=round(t2 - t1, 2),
                                                                 compile=round(time.perf_counter() - t2, 2)))
  t3 = time.perf_counter()

  mem = compiled.memory_analysis()
  arguments, outputs = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp, code = mem.alias_size_in_bytes, mem.temp_size_in_bytes, mem.generated_code_size_in_bytes
  # Donated buffers appear both as arguments and outputs; they exist once.
  total = arguments + outputs - alias + temp + code
  # XLA's peak is the live buffers at the worst point of the schedule, what the TPU compiler itself holds against
  # the HBM (its out-of-memory error quotes it); where it gives none, the total is the bound.
  xla_peak = getattr(mem, 'peak_memory_in_bytes', 0) or 0
  peak = xla_peak + code if xla_peak else total

  num_devices = trainer.mesh.size
  tokens = config.data.global_batch_size * config.data.seq_len
  model_flops = metrics_lib.flops_per_token(config.model, config.data.seq_len) * tokens / num_devices
  model_matmul_flops = 6 * metrics_lib.matmul_params(config.model) * tokens / num_devices
  cost = _cost(compiled)
  step = hlo_analysis.analyze(compiled)
  device_kind = trainer.mesh.devices.flat[0].device_kind
  memory_gb = {k: v / GIB for k, v in dict(arguments=arguments, outputs=outputs, alias=alias, temporaries=temp,
                                            generated_code=code, total=total, peak_estimate=peak).items()}
  result = dict(
      target=spec.name if spec else None,
      device_kind=device_kind,
      platform=attention.platform_of(trainer.mesh.devices.flat),
      num_devices=num_devices,
      mesh=dict(trainer.mesh.shape),
      params=params,
      active_matmul_params=metrics_lib.matmul_params(config.model),  # a mixture of experts: what a token multiplies
      params_gb_per_device=_per_device_bytes(state.params) / GIB,
      opt_state_gb_per_device=_per_device_bytes(state.opt_state) / GIB,
      batch_gb_per_device=_per_device_bytes(batch) / GIB,
      memory_per_device_bytes=dict(arguments=arguments, outputs=outputs, alias=alias, temporaries=temp,
                                   generated_code=code, total=total, peak_estimate=peak,
                                   xla_peak=xla_peak or None),
      memory_per_device_gb=memory_gb,
      **_fits(config, spec, memory_gb['peak_estimate']),
      compiled_matmul_flops_per_device=step['matmul_flops'],
      xla_flops_per_device=float(cost.get('flops', 0.0)) or None,
      xla_bytes_accessed_per_device=float(cost.get('bytes accessed', 0.0)) or None,
      model_flops_per_device=model_flops,
      model_matmul_flops_per_device=model_matmul_flops,
      flops_per_token=metrics_lib.flops_per_token(config.model, config.data.seq_len),
      tokens_per_step=tokens,
      attention_kernels=step['attention_kernels'],
      collectives=step['collectives'],
      unknown_trip_counts=step['unknown_trip_counts'],
      seconds=dict(setup=round(t1 - t0, 2), lower=round(t2 - t1, 2), compile=round(t3 - t2, 2)),
      config=summary(config),
  )
  return result


def _refused(config, trainer, spec, params, message: str, seconds: dict) -> dict[str, Any]:
  """The report of a step the target's compiler refused for memory (libtpu does, where a GPU compile goes on
  with XLA's rematerialisation): fits is False, with the compiler's own figures where its message has them."""
  line = next((l for l in message.splitlines() if 'RESOURCE_EXHAUSTED' in l), message.splitlines()[0])
  figures = re.findall(r'\(([0-9.]+)G\)', line)
  memory = dict(required=float(figures[0]), available=float(figures[1])) if len(figures) >= 2 else {}
  return dict(target=spec.name if spec else None, device_kind=trainer.mesh.devices.flat[0].device_kind,
              platform=attention.platform_of(trainer.mesh.devices.flat), num_devices=trainer.mesh.size,
              mesh=dict(trainer.mesh.shape), params=params, fits=False, refused=line.strip(),
              memory_per_device_gb=memory, attention_kernels=[], seconds=seconds, config=summary(config))


def _fits(config, spec, peak_gb: float) -> dict[str, Any]:
  """Against a target: its memory, the share JAX uses by default, and config.xla.gpu_memory_fraction on GPUs.
  Without one: the peak against a few common devices (95% of their memory)."""
  if spec is None:
    return dict(fits=None, fits_devices={name: peak_gb <= cap * 0.95 for name, cap in DEVICE_MEMORY_GB.items()})
  fractions = {'default': spec.usable_fraction}
  if spec.platform == 'gpu' and config.xla.gpu_memory_fraction:
    fractions['config.xla.gpu_memory_fraction'] = config.xla.gpu_memory_fraction
  usable = {name: spec.memory_gib * fraction for name, fraction in fractions.items()}
  effective = usable.get('config.xla.gpu_memory_fraction', usable['default'])
  return dict(fits=peak_gb <= effective, device_memory_gb=spec.memory_gib, usable_memory_gb=usable,
              usable_fractions=fractions)


def summary(config) -> dict[str, Any]:
  """The fields that decide speed and memory, for reports."""
  m, d, t = config.model, config.data, config.train
  return dict(d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
              ffn_dim=m.ffn_dim, vocab_size=m.vocab_size, seq_len=d.seq_len, global_batch_size=d.global_batch_size,
              grad_accum_steps=t.grad_accum_steps, dtype=m.dtype, param_dtype=m.param_dtype,
              logits_dtype=m.logits_dtype, moments_dtype=t.moments_dtype, attention=m.attention, remat=m.remat,
              scan_layers=m.scan_layers, ffn=m.ffn, moe_compute=m.moe_compute,
              mesh=dict(data=config.mesh.data, expert=config.mesh.expert, fsdp=config.mesh.fsdp,
                        context=config.mesh.context, tensor=config.mesh.tensor),
              context_exchange=config.mesh.context_exchange, context_load_balance=config.mesh.context_load_balance)


def format_report(r: dict[str, Any]) -> str:
  g = r['memory_per_device_gb']
  where = f'target {r["target"]}: ' if r['target'] else ''
  if r.get('refused'):
    return '\n'.join([
        f'dry run: {r["config"]["num_layers"]} layers, d_model {r["config"]["d_model"]}, seq '
        f'{r["config"]["seq_len"]}, global batch {r["config"]["global_batch_size"]}, mesh {r["mesh"]} on {where}'
        f'{r["num_devices"]} x {r["device_kind"]} ({r["platform"]})',
        f'fits {r["target"] or "these devices"}: no: the compiler refused the step for memory'
        + (f' ({g["required"]:.2f} GiB needed per device, {g["available"]:.2f} available)' if g else ''),
        f'  {r["refused"]}',
        'lower the batch, remat more (config.model.remat=full), shard more, or use bfloat16 moments '
        '(config.train.moments_dtype)'])
  lines = [
      f'dry run: {r["config"]["num_layers"]} layers, d_model {r["config"]["d_model"]}, seq {r["config"]["seq_len"]}, '
      f'global batch {r["config"]["global_batch_size"]}, mesh {r["mesh"]} on {where}{r["num_devices"]} x '
      f'{r["device_kind"]} ({r["platform"]})',
      f'parameters (eval_shape): {r["params"]:,}; matmul weights a token uses: {r["active_matmul_params"]:,}',
      f'state per device: params {r["params_gb_per_device"]:.3f} GiB, optimizer {r["opt_state_gb_per_device"]:.3f} '
      f'GiB; batch {r["batch_gb_per_device"] * 1024:.2f} MiB',
      'compiled train step, memory per device (GiB):',
      f'  arguments       {g["arguments"]:10.3f}',
      f'  outputs         {g["outputs"]:10.3f}',
      f'  aliased (donated, counted once) {g["alias"]:.3f}',
      f'  temporaries     {g["temporaries"]:10.3f}',
      f'  generated code  {g["generated_code"]:10.3f}',
      f'  total           {g["total"]:10.3f}   (arguments + outputs - aliased + temporaries + code)',
      f'  peak estimate   {g["peak_estimate"]:10.3f}   ' + (
          '(XLA\'s peak: live buffers at the worst point of the schedule, + code)'
          if r['memory_per_device_bytes']['xla_peak'] else '(the total: XLA gave no peak)'),
  ]
  if r['target']:
    usable = ', '.join(f'{name} {r["usable_fractions"][name]:.2f}: {gb:.1f} GiB'
                       for name, gb in r['usable_memory_gb'].items())
    lines.append(f'fits {r["target"]}: {"yes" if r["fits"] else "no"} (peak {g["peak_estimate"]:.1f} GiB of '
                 f'{r["device_memory_gb"]:.1f} GiB per device; usable at {usable})')
  else:
    fits = ', '.join(f'{name}: {"yes" if ok else "no"}' for name, ok in r['fits_devices'].items())
    lines.append(f'fits (peak estimate <= 95% of device memory): {fits}')
  compiled, model = r['compiled_matmul_flops_per_device'], r['model_flops_per_device']
  in_kernels = r['attention_kernels'] != ['dense']
  reference = r['model_matmul_flops_per_device'] if in_kernels else model
  lines.append(f'FLOPs per device and step: model {model:.4g} (6N + attention, {r["flops_per_token"]:.4g}/token; '
               f'matmuls alone {r["model_matmul_flops_per_device"]:.4g})')
  lines.append(f'  compiled matmuls {compiled:.4g} (every loop iteration, remat recompute included'
               + ('; attention inside its kernel not counted' if in_kernels else '; attention as einsums')
               + f'): {compiled / reference:.3f} x the model\'s {"matmuls" if in_kernels else "FLOPs"}')
  if r['xla_flops_per_device']:
    note = ' (counts a scanned loop body once)' if r['config']['scan_layers'] else ''
    lines.append(f'  XLA cost analysis {r["xla_flops_per_device"]:.4g}{note}')
  lines.append(f'attention kernels in the compiled step: {", ".join(r["attention_kernels"])}')
  def collective(op, c):
    fused = f' ({c["fused"]} of them all-reduce-scatter fusions)' if c.get('fused') else ''
    return f'{op} {c["count"]} x{fused}, {c["bytes"] / GIB:.3f} GiB, each device sends {c["sent_bytes"] / GIB:.3f} GiB'
  collectives = '; '.join(collective(op, c) for op, c in r['collectives'].items())
  lines.append(f'collectives per step (results; bytes sent by the ring algorithm): {collectives or "none"}')
  if r['platform'] == 'cpu':
    lines.append('  compiled for CPU: arguments/outputs are exact; temporaries are indicative of a GPU/TPU compile'
                 ' (use --target)')
  s = r['seconds']
  lines.append(f'time: setup {s["setup"]} s, lower {s["lower"]} s, compile {s["compile"]} s')
  return '\n'.join(lines)


def report(config, devices=None, stream=sys.stdout, target: str | None = None) -> dict[str, Any]:
  """Prints the readable report and then one JSON line with every figure (target, fits, memory_per_device_gb,
  attention_kernels, ...); returns the figures.

  A user error (a field that cannot work on this mesh, an unknown target, a missing compiler plugin) exits with
  its one-line message, as training does.
  """
  try:
    result = analyze(config, devices, target)
  except UserError as e:
    raise SystemExit(f'error: {e}') from None
  print(format_report(result), file=stream)
  print(json.dumps(result), file=stream, flush=True)
  return result
