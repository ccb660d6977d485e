"""The preset x target table of docs/performance.md: every row an ahead-of-time compile of the real train step.

  python benchmarks/aot_table.py                 # all rows, one after the other; rewrites the table in the doc
  python benchmarks/aot_table.py --rows 7b       # only rows whose preset or target contains '7b'
  python benchmarks/aot_table.py --print_only    # print the table, leave the doc alone

Each row runs `python -m llm_jax.main --config=experiments/<preset>.py --dry_run --target=<target> [overrides]`
in its own process (the command is in the table, to rerun one row) and reads the report's JSON line. Needs the
'aot' extra (libtpu and the CUDA plugin). On 2 CPU cores the whole table takes about 10 minutes; the 7B and 8B
TPU compiles are 1 to 3 minutes each, Mixtral 8x7B on v5p-64 about 4.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs' / 'performance.md'
START, END = '<!-- aot-table:start -->', '<!-- aot-table:end -->'

# (preset, target, overrides, why the overrides)
ROWS = [
    ('1b', 'h100', (), ''),
    ('1b', 'v5e-8', (), ''),
    ('7b', 'h200', (), ''),
    ('7b', 'v5p-8', (), ''),
    ('7b', 'v5p-8', ('--config.model.remat=minimal_with_context',), 'TPU memory is ample: less recompute'),
    ('llama3_8b', 'h100x8', (), ''),
    ('llama3_8b', 'v5p-8', (), ''),
    ('llama3_2_1b', 'h100', (), ''),
    ('qwen3_8b', 'h100x8', (), ''),
    ('qwen3_8b', 'v5p-8', (), ''),
    ('gemma3_4b', 'h100x8', (), ''),
    ('gemma3_4b', 'v5p-8', (), ''),
    ('mixtral_8x7b', 'v5p-64', (), ''),
]


def command(preset: str, target: str, overrides) -> list[str]:
  return [sys.executable, '-m', 'llm_jax.main', f'--config=experiments/{preset}.py', '--dry_run',
          f'--target={target}', *overrides]


def run_row(preset, target, overrides) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  start = time.perf_counter()
  run = subprocess.run(command(preset, target, overrides), cwd=ROOT, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  lines = [line for line in run.stdout.splitlines() if line.startswith('{')]
  if run.returncode or not lines:
    error = [line for line in run.stderr.splitlines() if line.startswith('error')] or run.stderr.splitlines()[-3:]
    return dict(error=' '.join(error)[:300], wall_seconds=seconds)
  return dict(json.loads(lines[-1]), wall_seconds=seconds)


def _gib(x: float) -> str:
  return f'{x:.1f}'


def table(results) -> str:
  head = ('| preset | target | mesh | attention | per device (GiB): arguments, temporaries; peak | of (usable) '
          '| fits | compiled / model matmul FLOPs | compile | command |')
  lines = [head, '|' + '---|' * 10]
  for (preset, target, overrides, why), r in results:
    cmd = ' '.join(['python -m llm_jax.main', f'--config=experiments/{preset}.py', '--dry_run',
                    f'--target={target}', *overrides])
    note = f' ({why})' if why else ''
    if 'error' in r:
      lines.append(f'| {preset} | {target} | | | {r["error"]} | | | | | `{cmd}`{note} |')
      continue
    g = r['memory_per_device_gb']
    usable = r['usable_memory_gb']
    usable_text = ', '.join(f'{_gib(v)}' for v in usable.values())
    mesh = ' x '.join(f'{k} {v}' for k, v in r['mesh'].items() if v > 1) or 'one device'
    ratio = r['compiled_matmul_flops_per_device'] / r['model_matmul_flops_per_device']
    lines.append(
        f'| {preset} | {target} | {mesh} | {", ".join(r["attention_kernels"])} | {_gib(g["arguments"])}, '
        f'{_gib(g["temporaries"])}; **{_gib(g["peak_estimate"])}** | {_gib(r["device_memory_gb"])} '
        f'({usable_text}) | {"yes" if r["fits"] else "**no**"} | {ratio:.3f} | {r["seconds"]["compile"]:.0f} s | '
        f'`{cmd}`{note} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rows', default='', help='only rows whose preset or target contains this text')
  parser.add_argument('--print_only', action='store_true', help='print the table; do not rewrite the doc')
  args = parser.parse_args()
  rows = [row for row in ROWS if args.rows in row[0] or args.rows in row[1]]
  results = []
  for row in rows:
    result = run_row(*row[:3])
    print(f'{row[0]} on {row[1]} {" ".join(row[2])}: '
          + (result.get('error') or f'peak {result["memory_per_device_gb"]["peak_estimate"]:.1f} GiB, '
             f'fits {result["fits"]}, {result["wall_seconds"]:.0f} s'), file=sys.stderr, flush=True)
    results.append((row, result))
  text = table(results)
  print(text)
  if args.print_only or args.rows:
    return
  doc = DOC.read_text()
  if START not in doc or END not in doc:
    raise SystemExit(f'{DOC} has no {START} ... {END} markers')
  before, rest = doc.split(START, 1)
  _, after = rest.split(END, 1)
  temporary = DOC.with_suffix('.md.tmp')
  temporary.write_text(f'{before}{START}\n{text}\n{END}{after}')
  temporary.replace(DOC)


if __name__ == '__main__':
  main()
