"""Serving throughput and latency on a mixed workload: llm_jax's engine (in process, or a running server) against
transformers' `generate` in static batches, on the same request set, in one run.

  python benchmarks/serve_benchmark.py --config=experiments/125m.py [--num_requests=128] [--concurrency=16]
      [--prompt_range=16,512] [--output_range=16,256] [--request_rate=0] [--seed=0] [--dtype=float32]
      [--engine_dtype=auto]
      [--url=http://127.0.0.1:8000] [--systems=engine,transformers]

The request set is made here, seeded: prompt and output lengths uniform in their ranges, prompt tokens uniform
over the vocabulary; every request generates exactly its output length (ignore_eos; transformers: no EOS). Both
models have the config's shape and random weights (speed is what is measured, not text). Systems:

  engine        llm_jax.serving.Engine in this process, max_seqs = concurrency; requests all arrive at t=0, or
                at --request_rate per second (Poisson) when given. The workload runs once untimed first: the
                engine compiles each bucketed shape once in its life, and the timed pass measures serving
  server        the same requests to a running `python -m llm_jax.serve` at --url (/v1/completions, token-id
                prompts, streamed), at most `concurrency` in flight; likewise warmed up by one untimed pass
  transformers  LlamaForCausalLM.generate in arrival order, `concurrency` requests a batch, left-padded, each
                batch generating its longest output (greedy)

One JSON line per system: output_tokens_per_s (the requests' output tokens over the wall time), ttft_s and tpot_s
(time per output token after the first) p50/p99, wall_s; the engine's adds its steps and slots_per_token (token
slots of its bucketed batches per token computed: the padding overhead). Timing on shared CPUs is noisy: compare systems of one
run, as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def workload(num: int, prompt_range, output_range, vocab: int, seed: int):
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(3, vocab, size=int(rng.integers(prompt_range[0], prompt_range[1] + 1))).tolist()
             for _ in range(num)]
  outputs = [int(rng.integers(output_range[0], output_range[1] + 1)) for _ in range(num)]
  return prompts, outputs


def other_tokens(prompts, vocab: int):
  """The prompts with every token moved to the next id (ids 3 and up, as `workload` draws them): the same lengths,
  no shared prefix with the originals."""
  return [[3 + (t - 2) % (vocab - 3) for t in p] for p in prompts]


def percentiles(values):
  if not values:
    return None
  values = sorted(values)
  pick = lambda q: values[min(len(values) - 1, int(round(q * (len(values) - 1))))]  # noqa: E731
  return dict(p50=round(pick(0.5), 4), p99=round(pick(0.99), 4), mean=round(statistics.mean(values), 4))


def report(system, total_tokens, wall, ttfts, tpots, **extra):
  row = dict(system=system, output_tokens_per_s=round(total_tokens / wall, 1), wall_s=round(wall, 2),
             output_tokens=total_tokens, ttft_s=percentiles(ttfts), tpot_s=percentiles(tpots), **extra)
  print(json.dumps(row), flush=True)
  return row


def run_engine(cfg, params, prompts, outputs, concurrency, rate, seed, engine_dtype='auto'):
  from llm_jax.serving import Engine, EngineConfig, SamplingParams
  longest = max(len(p) + o for p, o in zip(prompts, outputs))
  pages = concurrency * -(-longest // 16) + 1
  engine = Engine(cfg, params, config=EngineConfig(max_seqs=concurrency, num_pages=pages,
                                                   max_queue=len(prompts) + 1, dtype=engine_dtype),
                  eos_id=-1)
  # warm-up: the whole workload once, untimed, so every bucketed shape it meets is compiled (a server compiles
  # each shape once in its life; a timed first pass would measure the compiler). Its prompts have the workload's
  # lengths but other tokens: the timed pass must not find them in the prefix cache (that would skip prefill
  # work the other systems do, and schedule other shapes than the warm-up compiled)
  engine.generate(other_tokens(prompts, cfg.vocab_size),
                  [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outputs])
  arrivals = np.zeros(len(prompts)) if not rate else np.cumsum(np.random.default_rng(seed).exponential(
      1.0 / rate, len(prompts)))
  before = dict(engine.counters)
  start = time.perf_counter()
  first, done, added = {}, {}, 0
  while len(done) < len(prompts):
    now = time.perf_counter() - start
    while added < len(prompts) and arrivals[added] <= now:
      engine.add_request(prompts[added], SamplingParams(max_tokens=outputs[added], temperature=0.0,
                                                        ignore_eos=True), str(added))
      added += 1
    if not engine.has_unfinished():
      time.sleep(max(0.0, arrivals[added] - now))
      continue
    for out in engine.step():
      i = int(out.request_id)
      t = time.perf_counter() - start
      if i not in first and out.outputs[0].token_ids:
        first[i] = t
      if out.finished:
        done[i] = t
  wall = time.perf_counter() - start
  ttfts = [first[i] - arrivals[i] for i in range(len(prompts))]
  tpots = [(done[i] - first[i]) / (outputs[i] - 1) for i in range(len(prompts)) if outputs[i] > 1]
  timed = {k: engine.counters[k] - before[k] for k in ('steps', 'batch_tokens', 'batch_slots')}
  return report('llm_jax-engine', sum(outputs), wall, ttfts, tpots, concurrency=concurrency,
                compute_dtype=engine.model_config.dtype, preemptions=engine.stats()['preemptions'],
                steps=timed['steps'], slots_per_token=round(timed['batch_slots'] / timed['batch_tokens'], 3))


async def _server(url, model, prompts, outputs, concurrency):
  import httpx
  limit = asyncio.Semaphore(concurrency)
  ttfts, tpots = [], []

  async def one(client, i):
    async with limit:
      sent = time.perf_counter()
      first = None
      body = dict(model=model, prompt=prompts[i], max_tokens=outputs[i], temperature=0.0, stream=True,
                  ignore_eos=True)
      async with client.stream('POST', f'{url}/v1/completions', json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
          if line.startswith('data: ') and line != 'data: [DONE]' and first is None:
            first = time.perf_counter()
      end = time.perf_counter()
      ttfts.append(first - sent)
      if outputs[i] > 1:
        tpots.append((end - first) / (outputs[i] - 1))

  async with httpx.AsyncClient(timeout=None) as client:
    start = time.perf_counter()
    await asyncio.gather(*(one(client, i) for i in range(len(prompts))))
    return time.perf_counter() - start, ttfts, tpots


def run_server(url, prompts, outputs, concurrency, vocab):
  import httpx
  model = httpx.get(f'{url}/v1/models').json()['data'][0]['id']
  # warm-up: compiles the workload's shapes, with other tokens (no prefix cache hits in the timed pass)
  asyncio.run(_server(url, model, other_tokens(prompts, vocab), outputs, concurrency))
  wall, ttfts, tpots = asyncio.run(_server(url, model, prompts, outputs, concurrency))
  return report('llm_jax-server', sum(outputs), wall, ttfts, tpots, concurrency=concurrency)


def run_transformers(cfg, prompts, outputs, batch, dtype):
  import torch
  import transformers
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
      pad_token_id=0, bos_token_id=1, eos_token_id=None)
  model = transformers.LlamaForCausalLM(hf_config).to(getattr(torch, dtype)).eval()

  class Clock(transformers.LogitsProcessor):
    def __init__(self):
      self.times = []

    def __call__(self, input_ids, scores):
      self.times.append(time.perf_counter())
      return scores

  def generate(rows, new):
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
      ids[j, width - len(r):] = torch.tensor(r)
      mask[j, width - len(r):] = 1
    clock = Clock()
    with torch.inference_mode():
      model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                     logits_processor=transformers.LogitsProcessorList([clock]), pad_token_id=0)
    return clock.times

  generate(prompts[:batch], 4)  # warm-up
  start = time.perf_counter()
  ttfts, tpots = [], []
  for b in range(0, len(prompts), batch):
    rows, news = prompts[b:b + batch], outputs[b:b + batch]
    times = generate(rows, max(news))
    for n in news:  # a request's tokens are out when the batch has made n of them
      ttfts.append(times[0] - start)
      if n > 1:
        tpots.append((times[n - 1] - times[0]) / (n - 1))
  wall = time.perf_counter() - start
  return report('transformers-static', sum(outputs), wall, ttfts, tpots, batch=batch, torch=torch.__version__)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/125m.py')
  parser.add_argument('--num_requests', type=int, default=128)
  parser.add_argument('--prompt_range', default='16,512')
  parser.add_argument('--output_range', default='16,256')
  parser.add_argument('--concurrency', type=int, default=16)
  parser.add_argument('--request_rate', type=float, default=0.0, help='requests/s (Poisson); 0 = all at once')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--engine_dtype', default='auto', help='EngineConfig.dtype (auto: float32 on CPU)')
  parser.add_argument('--url', default='', help='a running llm_jax.serve (adds the server system)')
  parser.add_argument('--systems', default='engine,transformers')
  args = parser.parse_args()

  import dataclasses

  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from llm_jax import config as config_lib
  from llm_jax.model import Transformer, TransformerConfig

  config = config_lib.load_experiment(args.config)
  cfg = dataclasses.replace(TransformerConfig.from_config(config), dtype=args.dtype)
  prompts, outputs = workload(args.num_requests, [int(x) for x in args.prompt_range.split(',')],
                              [int(x) for x in args.output_range.split(',')], cfg.vocab_size, args.seed)
  assert max(len(p) + o for p, o in zip(prompts, outputs)) <= cfg.max_seq_len, 'lengths exceed model.max_seq_len'
  print(json.dumps(dict(config=args.config, dtype=args.dtype, num_requests=args.num_requests,
                        prompt_range=args.prompt_range, output_range=args.output_range,
                        prompt_tokens=sum(map(len, prompts)), output_tokens=sum(outputs), cpus=os.cpu_count(),
                        load_average=os.getloadavg()[0], backend=jax.default_backend())), flush=True)
  systems = args.systems.split(',') + (['server'] if args.url else [])
  rows = {}
  if 'engine' in systems:
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params']
    rows['engine'] = run_engine(cfg, params, prompts, outputs, args.concurrency, args.request_rate, args.seed,
                                 args.engine_dtype)
    del params
  if 'server' in systems:
    rows['server'] = run_server(args.url.rstrip('/'), prompts, outputs, args.concurrency, cfg.vocab_size)
  if 'transformers' in systems:
    rows['transformers'] = run_transformers(cfg, prompts, outputs, args.concurrency, args.dtype)
  if 'transformers' in rows:
    base = rows['transformers']['output_tokens_per_s']
    print(json.dumps({f'{k}_over_transformers': round(v['output_tokens_per_s'] / base, 2)
                      for k, v in rows.items() if k != 'transformers'}), flush=True)


if __name__ == '__main__':
  main()
