"""Where a profiled step's device time goes: GEMM / attention / the rest, from a jax.profiler Perfetto trace.

  python benchmarks/trace_summary.py <workdir>/profile [--top 15]

Reads the newest `*.trace.json.gz` under the directory (written by config.train.profile_steps), keeps the
complete events ('ph' == 'X') of device threads (process names with '/device:' in them; on a CPU, where there are
none, every thread), and prints the total time per class and the top kernels by time. Kernel names are matched by
substrings: GEMM = cuBLAS/CUTLASS/nvjet/triton gemm kernels; attention = cuDNN fused attention (fmha/flash).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os

GEMM = ('gemm', 'cutlass', 'nvjet', 'xmma', 'cublas', 'matmul', 'dot')
ATTENTION = ('fmha', 'flash', 'cudnn', 'attention')


def classify(name: str) -> str:
  lowered = name.lower()
  if any(key in lowered for key in ATTENTION):
    return 'attention'
  if any(key in lowered for key in GEMM):
    return 'gemm'
  return 'other'


def summarize(trace: dict, top: int = 15) -> dict:
  processes = {e['pid']: e['args'].get('name', '') for e in trace.get('traceEvents', [])
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  device_pids = {pid for pid, name in processes.items() if '/device:' in name}
  events = [e for e in trace.get('traceEvents', []) if e.get('ph') == 'X' and 'dur' in e
            and (not device_pids or e.get('pid') in device_pids)]
  by_name = collections.Counter()
  for e in events:
    by_name[e['name']] += float(e['dur'])
  total = sum(by_name.values()) or 1.0
  by_class = collections.Counter()
  for name, dur in by_name.items():
    by_class[classify(name)] += dur
  return dict(device_events=bool(device_pids), total_us=total,
              share={k: by_class[k] / total for k in ('gemm', 'attention', 'other')},
              top=[(name, dur, dur / total) for name, dur in by_name.most_common(top)])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('directory')
  parser.add_argument('--top', type=int, default=15)
  args = parser.parse_args()
  paths = sorted(glob.glob(os.path.join(args.directory, '**', '*.trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise SystemExit(f'{args.directory}: no *.trace.json.gz (was config.train.profile_steps set?)')
  with gzip.open(paths[-1]) as f:
    result = summarize(json.load(f), args.top)
  print(f'{paths[-1]}: {"device" if result["device_events"] else "host (no device threads)"} time '
        f'{result["total_us"] / 1e3:.1f} ms')
  print('  ' + '  '.join(f'{k} {v:6.1%}' for k, v in result['share'].items()))
  for name, dur, share in result['top']:
    print(f'  {share:6.1%} {dur / 1e3:9.2f} ms  {name[:110]}')


if __name__ == '__main__':
  main()
