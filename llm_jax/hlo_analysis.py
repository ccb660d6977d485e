"""What a compiled step does, read from its optimized HLO text (`compiled.as_text()`), per device.

XLA's own cost analysis counts the body of a while loop once, so with scanned layers it reports about one
layer's FLOPs, and for some targets (a deviceless GPU compile) it returns nothing. This walks the partitioned
module from its entry computation instead, multiplying every loop body by its trip count:

  matmul FLOPs   2 * output elements * contracted size of every dot and convolution, including the recompute
                 that remat adds (fused kernels such as splash or cuDNN attention are opaque: not counted),
                 and TPU's grouped-matmul kernels of jax.lax.ragged_dot (Mosaic calls with a ragged_dot_tiling)
                 at the compiler's own estimate: 2 * rows * contracted * columns of the whole (padded) operand,
                 an upper bound where a kernel skips the tiles past the groups' rows
  attention      which kernels the step runs: 'splash' (a Mosaic call of the splash kernel), 'ragged_paged' (jax's
                 Pallas TPU ragged paged attention: the serving engine's steps), 'cudnn' (cuDNN
                 fused attention on q, k, v alone), 'cudnn_packed' (with packed lengths and offsets),
                 'cudnn_bias' (with a bias operand: a dense mask), or 'dense' (no attention kernel: XLA's einsums)
  collectives    all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute: count, bytes of their
                 results, and the bytes each device sends (and receives) per step under the bandwidth-optimal
                 (ring) algorithm over its group of n devices: all-gather (n-1)/n of its result, reduce-scatter
                 (n-1) x its result, all-reduce 2(n-1)/n of its operand, all-to-all (n-1)/n, a permute its
                 buffer. TPU's all-reduce-scatter fusions (a kCustom fusion whose all-reduce is cut to this
                 device's slice by a dynamic-slice: the backend runs a reduce-scatter) count as reduce-scatters,
                 (n-1)/n of the all-reduce's operand; `fused` says how many of them. The largest sources of each
                 kind (the jax op named in the instruction's metadata) say what each collective is for.

A conditional (cuDNN's per-batch choice of kernel) counts its costliest branch, and its kernels are all listed.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

_DTYPE_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 'bf16': 2, 'f16': 2,
                's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8, 'c64': 8,
                'c128': 16}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class StepStats:
  matmul_flops: float = 0.0
  attention_kernels: set = dataclasses.field(default_factory=set)
  collectives: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # op -> count
  collective_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # op -> bytes
  collective_traffic: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # op -> sent
  fused_reduce_scatters: float = 0  # of the reduce-scatters, TPU's all-reduce-scatter fusions
  sources: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (op, jax op) -> sent
  unknown_trip_counts: int = 0  # while loops whose trip count XLA did not record (counted once)

  def add(self, other: 'StepStats', times: float = 1.0) -> None:
    self.matmul_flops += other.matmul_flops * times
    self.attention_kernels |= other.attention_kernels
    for op in other.collectives:
      self.collectives[op] += other.collectives[op] * times
      self.collective_bytes[op] += other.collective_bytes[op] * times
      self.collective_traffic[op] += other.collective_traffic[op] * times
    for key, sent in other.sources.items():
      self.sources[key] += sent * times
    self.fused_reduce_scatters += other.fused_reduce_scatters * times
    self.unknown_trip_counts += other.unknown_trip_counts

  def add_collective(self, op: str, result_bytes: int, sent_bytes: float, source: str) -> None:
    self.collectives[op] += 1
    self.collective_bytes[op] += result_bytes
    self.collective_traffic[op] += sent_bytes
    self.sources[(op, source)] += sent_bytes

  def summary(self, top_sources: int = 3) -> dict:
    collectives = {}
    for op in sorted(self.collectives):
      top = sorted(((sent, src) for (kind, src), sent in self.sources.items() if kind == op), reverse=True)
      collectives[op] = dict(count=int(self.collectives[op]), bytes=int(self.collective_bytes[op]),
                             sent_bytes=int(self.collective_traffic[op]),
                             top_sources=[dict(op=src, sent_bytes=int(sent)) for sent, src in top[:top_sources]])
      if op == 'reduce-scatter':
        collectives[op]['fused'] = int(self.fused_reduce_scatters)
    return dict(matmul_flops=self.matmul_flops,
                attention_kernels=sorted(self.attention_kernels) or ['dense'],
                collectives=collectives,
                unknown_trip_counts=self.unknown_trip_counts)


@dataclasses.dataclass
class _Instruction:
  name: str
  type: str  # result type text: 'bf16[8,128]{1,0}' or a tuple '(f32[2]{0}, s32[])'
  opcode: str
  operands: list  # operand names
  operand_types: list  # their types where the text prints them inline, else None
  attributes: str  # everything after the operand list


def _dims(type_text: str) -> list[int]:
  match = _ARRAY.search(type_text)
  return [int(d) for d in match.group(2).split(',') if d] if match else []


def _largest_array_bytes(type_text: str) -> int:
  sizes = [math.prod(int(d) for d in dims.split(',') if d) * _DTYPE_BYTES.get(dtype, 4)
           for dtype, dims in _ARRAY.findall(type_text)]
  return max(sizes, default=0)


def _closing(text: str, start: int, open_char: str = '(', close_char: str = ')') -> int:
  """Index of the bracket closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == open_char:
      depth += 1
    elif text[i] == close_char:
      depth -= 1
      if depth == 0:
        return i
  return len(text) - 1


def _parse_instruction(line: str) -> _Instruction | None:
  line = line.strip()
  if line.startswith('ROOT '):
    line = line[5:]
  if ' = ' not in line or not line.startswith('%') and not re.match(r'[\w.\-]+ = ', line):
    return None
  name, rhs = line.split(' = ', 1)
  if rhs.startswith('('):
    end = _closing(rhs, 0)
    type_text, rest = rhs[:end + 1], rhs[end + 1:].lstrip()
  else:
    type_text, _, rest = rhs.partition(' ')
  paren = rest.find('(')
  if paren < 0:
    return None
  opcode = rest[:paren]
  end = _closing(rest, paren)
  operand_text, attributes = rest[paren + 1:end], rest[end + 1:]
  operands, types = [], []
  depth, current = 0, ''
  for char in operand_text + ',':  # split on top-level commas
    if char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    if char == ',' and depth == 0:
      part = current.strip()
      current = ''
      if not part:
        continue
      tokens = part.rsplit(' ', 1)
      operands.append(tokens[-1].lstrip('%'))
      types.append(tokens[0] if len(tokens) == 2 else None)
    else:
      current += char
  return _Instruction(name.lstrip('%'), type_text, opcode, operands, types, attributes)


_STARTS_LINE = re.compile(r'^\s*(ROOT\s+)?%?[\w.\-]+ = |^\s*}\s*$|^\s*(ENTRY\s+)?%?[\w.\-]+ \(.*\{\s*$|^\S')


def _logical_lines(text: str):
  """The text's lines with an instruction's continuation lines (a long backend_config, TPU's layout constraints)
  joined to it."""
  pending = None
  for line in text.splitlines():
    if pending is not None and not _STARTS_LINE.match(line):
      pending += line
      continue
    if pending is not None:
      yield pending
    pending = line
  if pending is not None:
    yield pending


_GROUPS_LISTED = re.compile(r'replica_groups=\{\{([0-9,]*)\}')
_GROUPS_IOTA = re.compile(r'replica_groups=\[(\d+),(\d+)\]')
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _group_size(attributes: str, partitions: int) -> int:
  """Devices in each replica group of a collective: listed ({{0,1,2,3},...}), iota ([groups,size]<=[...]), or mesh
  axes (mesh['axis_0'=4,'axis_1'=1] {'axis_0'}: the product of the named axes' sizes); all partitions otherwise."""
  listed = _GROUPS_LISTED.search(attributes)
  if listed:
    return max(1, len([d for d in listed.group(1).split(',') if d]))
  iota = _GROUPS_IOTA.search(attributes)
  if iota:
    return int(iota.group(2))
  mesh = _GROUPS_MESH.search(attributes)
  if mesh:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes.get(name, 1)) for name in re.findall(r"'([^']+)'", mesh.group(2)))
  return partitions


def _sent_bytes(op: str, result_bytes: int, operand_bytes: int, n: int) -> float:
  """Bytes one device sends (and receives) for a collective over n devices, bandwidth-optimal (module docstring)."""
  if n <= 1:
    return 0.0
  if op == 'all-gather':
    return result_bytes * (n - 1) / n
  if op == 'reduce-scatter':
    return result_bytes * (n - 1)
  if op == 'all-reduce':
    return 2 * operand_bytes * (n - 1) / n
  if op == 'all-to-all':
    return operand_bytes * (n - 1) / n
  return operand_bytes  # collective-permute


def _source(inst: _Instruction) -> str:
  """The jax op an instruction came from (its metadata's op_name, without the jit(...) prefix), or its name."""
  match = _OP_NAME.search(inst.attributes)
  return re.sub(r'^jit\([^)]*\)/', '', match.group(1)) if match else inst.name


def _parse_module(text: str):
  """{computation name: [instructions]}, the entry computation's name, {instruction name: result type}."""
  computations, types, entry, current = {}, {}, None, None
  for line in _logical_lines(text):
    stripped = line.strip()
    if stripped.endswith('{') and ('->' in stripped or stripped.startswith('ENTRY')) and ' = ' not in stripped:
      header = stripped[6:] if stripped.startswith('ENTRY') else stripped
      current = header.split(' ', 1)[0].lstrip('%')
      computations[current] = []
      if stripped.startswith('ENTRY'):
        entry = current
      continue
    if stripped == '}':
      current = None
      continue
    if current is None:
      continue
    instruction = _parse_instruction(stripped)
    if instruction is not None:
      computations[current].append(instruction)
      types[instruction.name] = instruction.type
  return computations, entry, types


def _called(attributes: str, key: str) -> list[str]:
  match = re.search(key + r'=\{?([^}]*?)\}?(?:,\s*[a-z_]+=|$)', attributes)
  if not match:
    match = re.search(key + r'=(%?[\w.\-]+)', attributes)
  if not match:
    return []
  return [name.strip().lstrip('%') for name in match.group(1).split(',') if name.strip()]


def _dot_flops(inst: _Instruction, types: dict) -> float:
  out = math.prod(_dims(inst.type))
  lhs_type = inst.operand_types[0] or types.get(inst.operands[0], '')
  lhs = _dims(lhs_type)
  match = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', inst.attributes)
  contracted = math.prod(lhs[int(d)] for d in match.group(1).split(',') if d) if match and lhs else 1
  return 2.0 * out * contracted


def _window_field(window: str, key: str, spatial: int, default: int) -> list:
  match = re.search(r'\b' + key + r'=([0-9_x\-]+)', window)
  return match.group(1).split('x') if match else [str(default)] * spatial


def _valid_taps(out: int, size: int, stride: int, pad_low: int, lhs_dilation: int, rhs_dilation: int,
                length: int) -> int:
  """Sum over output positions of the kernel taps that land on input (not padding, not a dilation hole)."""
  o = np.arange(out)[:, None]
  k = np.arange(size)[None, :]
  position = o * stride + k * rhs_dilation - pad_low  # in the dilated, padded input
  valid = (position >= 0) & (position <= (length - 1) * lhs_dilation) & (position % lhs_dilation == 0)
  return int(valid.sum())


def _convolution_flops(inst: _Instruction, types: dict) -> float:
  """2 * (output batch and features) * sum over output positions of the valid taps * input features: what XLA's
  cost analysis counts. TPU writes batched matmuls as convolutions whose padded windows mostly see padding,
  so the taps are counted, not the window size."""
  labels = re.search(r'dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)', inst.attributes)
  lhs = _dims(inst.operand_types[0] or types.get(inst.operands[0], ''))
  kernel = _dims(inst.operand_types[1] or types.get(inst.operands[1], ''))
  out = _dims(inst.type)
  if not labels or not lhs or not kernel or not out:
    return 0.0
  lhs_labels, kernel_labels, out_labels = labels.groups()
  window = re.search(r'window=\{([^}]*)\}', inst.attributes)
  window = window.group(1) if window else ''
  spatial = sorted(c for c in out_labels if c.isdigit())
  sizes = _window_field(window, 'size', len(spatial), 1)
  strides = _window_field(window, 'stride', len(spatial), 1)
  pads = _window_field(window, 'pad', len(spatial), 0)
  lhs_dilations = _window_field(window, 'lhs_dilate', len(spatial), 1)
  rhs_dilations = _window_field(window, 'rhs_dilate', len(spatial), 1)
  taps = 1
  for i, dim in enumerate(spatial):
    pad_low = int(pads[i].split('_')[0]) if '_' in pads[i] else int(pads[i])
    taps *= _valid_taps(out[out_labels.index(dim)], int(sizes[i]), int(strides[i]), pad_low,
                        int(lhs_dilations[i]), int(rhs_dilations[i]), lhs[lhs_labels.index(dim)])
  non_spatial = math.prod(size for size, label in zip(out, out_labels) if not label.isdigit())
  return 2.0 * non_spatial * taps * kernel[kernel_labels.index('i')]


_COST_FLOPS = re.compile(r'"cost_estimate":\{"flops":"(\d+)"')


def _ragged_dot_flops(inst: _Instruction) -> float:
  """The compiler's FLOP estimate of a TPU ragged_dot kernel (forward or input gradient; the weight gradient is a
  convolution), 0 for any other custom call."""
  if 'ragged_dot_tiling' not in inst.attributes:
    return 0.0
  flops = _COST_FLOPS.search(inst.attributes)
  return float(flops.group(1)) if flops else 0.0


def _attention_kernel(inst: _Instruction) -> str | None:
  target = re.search(r'custom_call_target="([^"]+)"', inst.attributes)
  target = target.group(1) if target else ''
  if target.startswith('__cudnn$fmha') and 'Backward' not in target:
    if 'Bias' in target:
      return 'cudnn_bias'
    return 'cudnn' if len(inst.operands) <= 3 else 'cudnn_packed'  # q, k, v (+ lengths and offsets: packed)
  if target == 'tpu_custom_call' and 'splash' in (inst.name + inst.attributes).lower():
    return 'splash'
  if target == 'tpu_custom_call' and 'ragged_paged_attention' in (inst.name + inst.attributes).lower():
    return 'ragged_paged'
  return None


def _constant(name: str, instructions: dict) -> int | None:
  """The integer value of a scalar constant (through copies), or None."""
  inst = instructions.get(name)
  while inst is not None and inst.opcode == 'copy':
    inst = instructions.get(inst.operands[0])
  if inst is None or inst.opcode != 'constant' or not inst.operands[0].lstrip('-').isdigit():
    return None
  return int(inst.operands[0])


def _trip_count(inst: _Instruction, computations: dict, instructions: dict) -> int | None:
  """Iterations of a while loop: XLA's known_trip_count where it recorded one (GPU, CPU), else read off a loop of
  the form `for (i = init; i < limit; i += step)` (how scans and SPMD's windowed einsums look on TPU; the
  windowed ones step by 2)."""
  known = _TRIP_COUNT.search(inst.attributes)
  if known:
    return int(known.group(1))
  conditions, bodies = _called(inst.attributes, 'condition'), _called(inst.attributes, 'body')
  if not conditions or not bodies or not computations.get(conditions[0]) or not computations.get(bodies[0]):
    return None
  root = computations[conditions[0]][-1]
  if root.opcode != 'compare' or 'direction=LT' not in root.attributes or len(root.operands) != 2:
    return None
  counter, limit = instructions.get(root.operands[0]), _constant(root.operands[1], instructions)
  index = re.search(r'\bindex=(\d+)', counter.attributes) if counter is not None else None
  if limit is None or counter is None or counter.opcode != 'get-tuple-element' or index is None:
    return None
  index = int(index.group(1))
  body_root = computations[bodies[0]][-1]
  if body_root.opcode != 'tuple' or index >= len(body_root.operands):
    return None
  update = instructions.get(body_root.operands[index])
  step = None
  if update is not None and update.opcode == 'add':
    step = next((v for v in (_constant(o, instructions) for o in update.operands) if v), None)
  if not step or step < 0:
    return None
  start = 0
  initial = instructions.get(inst.operands[0])
  if initial is not None and initial.opcode == 'tuple' and index < len(initial.operands):
    start = _constant(initial.operands[index], instructions) or 0
  return max(0, -(-(limit - start) // step))


def _all_reduce_scatter(body: list) -> _Instruction | None:
  """The all-reduce of a TPU all-reduce-scatter fusion's computation (an all-reduce whose result the root
  dynamic-slices), else None."""
  if not body or body[-1].opcode != 'dynamic-slice':
    return None
  return next((inst for inst in body if inst.opcode in ('all-reduce', 'all-reduce-start')), None)


def analyze_text(text: str) -> StepStats:
  computations, entry, types = _parse_module(text)
  instructions = {inst.name: inst for body in computations.values() for inst in body}
  partitions = re.search(r'num_partitions=(\d+)', text)
  partitions = int(partitions.group(1)) if partitions else 1
  cache: dict[str, StepStats] = {}

  def operand_bytes(inst: _Instruction) -> int:
    return sum(_largest_array_bytes(t or types.get(o, '')) for o, t in zip(inst.operands, inst.operand_types))

  def visit(name: str) -> StepStats:
    if name in cache:
      return cache[name]
    stats = StepStats()
    for inst in computations.get(name, []):
      op = inst.opcode
      if op == 'dot':
        stats.matmul_flops += _dot_flops(inst, types)
      elif op == 'convolution':
        stats.matmul_flops += _convolution_flops(inst, types)
      elif op == 'custom-call':
        stats.matmul_flops += _ragged_dot_flops(inst)
        kernel = _attention_kernel(inst)
        if kernel:
          stats.attention_kernels.add(kernel)
      base = op[:-6] if op.endswith('-start') else op
      if base in _COLLECTIVES:
        result = _largest_array_bytes(inst.type)
        n = _group_size(inst.attributes, partitions)
        stats.add_collective(base, result, _sent_bytes(base, result, operand_bytes(inst) or result, n),
                             _source(inst))
      if op == 'while':
        trips = _trip_count(inst, computations, instructions)
        if trips is None:
          stats.unknown_trip_counts += 1
        for body in _called(inst.attributes, 'body'):
          stats.add(visit(body), trips or 1)
      elif op == 'conditional':
        branches = _called(inst.attributes, 'branch_computations') or \
            _called(inst.attributes, 'true_computation') + _called(inst.attributes, 'false_computation')
        branch_stats = [visit(b) for b in branches]
        if branch_stats:
          costliest = max(branch_stats, key=lambda s: s.matmul_flops)
          stats.add(costliest)
          for other in branch_stats:
            stats.attention_kernels |= other.attention_kernels
      elif op in ('fusion', 'call', 'async-start'):
        callees = _called(inst.attributes, 'calls') + _called(inst.attributes, 'to_apply')
        reduce = _all_reduce_scatter(computations.get(callees[0], [])) if op == 'fusion' and callees else None
        if reduce is not None and 'kind=kCustom' in inst.attributes:
          full = operand_bytes(reduce) or _largest_array_bytes(reduce.type)
          n = _group_size(reduce.attributes, partitions)
          source = _source(inst) if _OP_NAME.search(inst.attributes) else _source(reduce)
          stats.add_collective('reduce-scatter', _largest_array_bytes(inst.type), full * (n - 1) / n, source)
          stats.fused_reduce_scatters += 1
          continue
        for callee in callees:
          stats.add(visit(callee))
    cache[name] = stats
    return stats

  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return visit(entry)


def analyze(compiled) -> dict:
  """StepStats.summary() of a `jax.stages.Compiled` (its optimized, partitioned HLO: per-device figures)."""
  return analyze_text(compiled.as_text()).summary()


def collectives_table(named_stats: dict[str, StepStats]) -> str:
  """A markdown table of the collectives of several compiled steps side by side: per kind, count, GiB of results,
  and GiB each device sends (module docstring), for each name."""
  gib = 2.0 ** 30
  kinds = sorted({op for stats in named_stats.values() for op in stats.collectives})
  names = list(named_stats)
  lines = ['| collective | ' + ' | '.join(f'{name}: count / result GiB / sent GiB' for name in names) + ' |',
           '|---|' + '---|' * len(names)]
  for op in kinds:
    cells = []
    for stats in named_stats.values():
      count = stats.collectives.get(op, 0)
      fused = f' ({int(stats.fused_reduce_scatters)} fused)' if op == 'reduce-scatter' and count else ''
      cells.append(f'{int(count)}{fused} / {stats.collective_bytes.get(op, 0) / gib:.2f} / '
                   f'{stats.collective_traffic.get(op, 0) / gib:.2f}')
    lines.append(f'| {op} | ' + ' | '.join(cells) + ' |')
  totals = [f'{sum(s.collectives.values()):.0f} / {sum(s.collective_bytes.values()) / gib:.2f} / '
            f'{sum(s.collective_traffic.values()) / gib:.2f}' for s in named_stats.values()]
  lines.append('| all | ' + ' | '.join(totals) + ' |')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  """python -m llm_jax.hlo_analysis NAME=FILE [NAME=FILE ...]: the collectives of compiled steps' optimized HLO text
  (an XLA dump's *after_optimizations.txt, e.g. from XLA_FLAGS=--xla_dump_to=DIR beside a --dry_run or MaxText's
  train_compile), as a table, then each one's largest sources per kind."""
  if not argv:
    raise SystemExit('usage: python -m llm_jax.hlo_analysis NAME=FILE [NAME=FILE ...] (optimized HLO text files)')
  named = {}
  for arg in argv:
    name, _, path = arg.rpartition('=')
    with open(path) as f:
      named[name or path] = analyze_text(f.read())
  print(collectives_table(named))
  for name, stats in named.items():
    print(f'\n{name}: largest sources (GiB sent per device)')
    for op, entry in stats.summary()['collectives'].items():
      for source in entry['top_sources']:
        print(f'  {op:18s} {source["sent_bytes"] / 2 ** 30:8.2f}  {source["op"][-150:]}')


if __name__ == '__main__':
  import sys
  main(sys.argv[1:])
