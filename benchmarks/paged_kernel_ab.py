"""Two paged attention kernels of the serving engine, side by side: two engines (one a kernel) step the same
workload alternately, so each pair of steps meets the same machine load (paired timings on shared CPUs).

  python benchmarks/paged_kernel_ab.py --config=experiments/125m.py --kernels=blocked,xla
      [--num_requests=16] [--prompt=32] [--output=128] [--concurrency=16] [--dtype=float32]

Both engines first run the workload once untimed with other prompt tokens (every shape compiled, nothing in the
prefix cache), then the timed pass. Prints one JSON line a kernel: the first step (the prefill of the whole
batch) and the median of the rest (decode steps), wall and CPU time (the process's, both threads), and whether
the two engines generated the same greedy tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/125m.py')
  parser.add_argument('--kernels', default='blocked,xla')
  parser.add_argument('--num_requests', type=int, default=16)
  parser.add_argument('--prompt', type=int, default=32)
  parser.add_argument('--output', type=int, default=128)
  parser.add_argument('--concurrency', type=int, default=16)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  args = parser.parse_args()

  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from benchmarks.serve_benchmark import other_tokens
  from llm_jax import config as config_lib
  from llm_jax.model import Transformer, TransformerConfig
  from llm_jax.serving import Engine, EngineConfig, SamplingParams

  cfg = dataclasses.replace(TransformerConfig.from_config(config_lib.load_experiment(args.config)),
                            dtype=args.dtype)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params']
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, args.prompt).tolist() for _ in range(args.num_requests)]
  greedy = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
  kernels = args.kernels.split(',')
  pages = args.concurrency * -(-(args.prompt + args.output) // 16) + 1
  engines = [Engine(cfg, params, config=EngineConfig(max_seqs=args.concurrency, num_pages=pages, attention=k),
                    eos_id=-1) for k in kernels]
  for engine in engines:
    engine.generate(other_tokens(prompts, cfg.vocab_size), greedy)
    for prompt in prompts:
      engine.add_request(prompt, greedy)
  wall, cpu, tokens = ([[] for _ in engines] for _ in range(3))
  busy = True
  while busy:
    busy = False
    for i, engine in enumerate(engines):
      start, start_cpu = time.perf_counter(), time.process_time()
      updates = engine.step()
      if updates:
        busy = True
        wall[i].append(time.perf_counter() - start)
        cpu[i].append(time.process_time() - start_cpu)
        tokens[i] += [(u.request_id, tuple(u.outputs[0].token_ids)) for u in updates if u.finished]
  for i, kernel in enumerate(kernels):
    print(json.dumps(dict(kernel=kernel, steps=len(wall[i]), first_step_ms=round(wall[i][0] * 1e3, 1),
                          first_step_cpu_ms=round(cpu[i][0] * 1e3, 1),
                          decode_step_ms=round(float(np.median(wall[i][1:])) * 1e3, 1),
                          decode_step_cpu_ms=round(float(np.median(cpu[i][1:])) * 1e3, 1),
                          load_average=os.getloadavg()[0])), flush=True)
  print(json.dumps(dict(same_tokens=all(sorted(t) == sorted(tokens[0]) for t in tokens))), flush=True)


if __name__ == '__main__':
  main()
