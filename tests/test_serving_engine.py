"""The serving engine against recomputing the full forward pass: greedy tokens, logprobs, and the scheduler's
paths (chunked prefill, requests arriving mid-run, the prefix cache, preemption), sampling per request, stops,
aborts and errors. Tiny models; shapes bucketed so each engine compiles a few functions."""

import asyncio
import dataclasses

import jax
import numpy as np
import pytest

from llm_jax.serving import Engine, EngineConfig, QueueFullError, RequestError, SamplingError, SamplingParams
from llm_jax.serving.async_engine import AsyncEngine

# The static decoder's tiny model and full-forward helpers (init_std 0.2: no near-ties in greedy choices).
from test_decoding import CFG, _forward, _params

SMALL = EngineConfig(page_size=4, max_seqs=4, max_chunk=8, max_prefill_tokens=16)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def last_logits(cfg, params, tokens):
  """Float64 logits after `tokens`, from a full forward pass over a fixed [1, max_seq_len] buffer (one compile:
  the model is causal, so the zeros right of the tokens never reach these logits)."""
  buffer = np.zeros((1, cfg.max_seq_len), np.int32)
  buffer[0, :len(tokens)] = tokens
  return np.asarray(_forward(cfg)(params, buffer), np.float64)[0, len(tokens) - 1]


def reference_greedy(cfg, params, prompt, n):
  """Greedy continuation recomputing the whole forward pass for every token, and each token's log-softmax."""
  tokens, logprobs = list(prompt), []
  for _ in range(n):
    logits = last_logits(cfg, params, tokens)
    log_softmax = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    tokens.append(int(np.argmax(logits)))
    logprobs.append(log_softmax)
  return tokens[len(prompt):], logprobs


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, CFG.vocab_size, size=n).tolist() for n in lengths]


LENGTHS = [5, 1, 17, 9, 30, 3]


@pytest.mark.parametrize('engine_config', [
    SMALL,
    dataclasses.replace(SMALL, prefix_caching=False),
    dataclasses.replace(SMALL, num_pages=14),  # 13 usable pages of 4 tokens for 6 requests of up to 40: preemption
], ids=['prefix-cache', 'no-prefix-cache', 'tiny-pool-preempts'])
def test_greedy_equals_full_forward(engine_config):
  params = _params(CFG)
  prompts = _prompts(LENGTHS, seed=3)
  engine = Engine(CFG, params, config=engine_config)
  outputs = engine.generate(prompts, GREEDY)
  for prompt, out in zip(prompts, outputs):
    assert out.finished and out.outputs[0].finish_reason == 'length'
    assert out.outputs[0].token_ids == reference_greedy(CFG, params, prompt, 10)[0]
  stats = engine.stats()
  assert stats['pages_used'] == 0 and stats['running'] == stats['waiting'] == 0
  if engine_config.num_pages:
    assert stats['preemptions'] > 0  # the pool was too small: the test exercised recompute


def test_requests_arriving_while_others_run_and_scanned_params():
  cfg = dataclasses.replace(CFG, scan_layers=True)
  params = _params(cfg)
  prompts = _prompts([7, 22, 2, 13], seed=5)
  engine = Engine(cfg, params, config=SMALL)
  done = {}
  engine.add_request(prompts[0], GREEDY, 'a')
  arrivals = {2: ('b', prompts[1]), 4: ('c', prompts[2]), 9: ('d', prompts[3])}
  step = 0
  while engine.has_unfinished() or arrivals:
    if step in arrivals:
      engine.add_request(arrivals[step][1], GREEDY, arrivals.pop(step)[0])
    for out in engine.step():
      if out.finished:
        done[out.request_id] = out.outputs[0].token_ids
    step += 1
  for request_id, prompt in zip('abcd', prompts):
    assert done[request_id] == reference_greedy(cfg, params, prompt, 10)[0], request_id


def test_prefix_cache_serves_a_shared_prompt_once():
  params = _params(CFG)
  system = _prompts([20], seed=7)[0]
  engine = Engine(CFG, params, config=SMALL)
  first = engine.generate([system + [3, 4]], GREEDY)[0]
  second = engine.generate([system + [5]], GREEDY)[0]
  assert first.num_cached_tokens == 0
  assert second.num_cached_tokens == 20  # five full pages of the shared 20 tokens
  assert second.outputs[0].token_ids == reference_greedy(CFG, params, system + [5], 10)[0]


def test_logprobs_and_prompt_logprobs_equal_the_full_forward():
  params = _params(CFG)
  prompt = _prompts([11], seed=9)[0]
  engine = Engine(CFG, params, config=SMALL)
  out = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2))[0]
  tokens, reference = reference_greedy(CFG, params, prompt, 4)
  completion = out.outputs[0]
  assert completion.token_ids == tokens
  for token, entry, log_softmax in zip(tokens, completion.logprobs, reference):
    top = np.argsort(-log_softmax)[:3]
    assert set(entry) == {token} | set(top.tolist())
    for t, lp in entry.items():
      assert lp == pytest.approx(log_softmax[t], abs=1e-4)
  # prompt logprobs: log p(prompt[j] | prompt[:j]) for j >= 1, from one forward pass over the prompt
  buffer = np.zeros((1, CFG.max_seq_len), np.int32)
  buffer[0, :len(prompt)] = prompt
  logits = np.asarray(_forward(CFG)(params, buffer), np.float64)[0, :len(prompt)]
  log_softmax = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
  for j in range(1, len(prompt)):
    entry = out.prompt_logprobs[j]
    assert entry[prompt[j]] == pytest.approx(log_softmax[j - 1, prompt[j]], abs=1e-4)
    assert len(entry) <= 3 and set(np.argsort(-log_softmax[j - 1])[:2].tolist()) <= set(entry)
  # max_tokens=0 scores the prompt only (lm-eval's loglikelihood through echo)
  scored = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
  assert scored.outputs[0].token_ids == [] and scored.outputs[0].finish_reason == 'length'
  assert [e and list(e.values())[0] for e in scored.prompt_logprobs[1:]] == \
      pytest.approx([out.prompt_logprobs[j][prompt[j]] for j in range(1, len(prompt))], abs=1e-5)


def test_tensor_parallel_mesh_decodes_the_same():
  from jax.sharding import Mesh
  params = _params(CFG)
  prompts = _prompts([6, 19, 3], seed=11)
  mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ('data', 'tensor'))
  rules = (('act_batch', 'data'), ('act_kv_heads', 'tensor'), ('act_heads', 'tensor'))
  engine = Engine(CFG, params, config=SMALL, mesh=mesh, rules=rules)
  leaf = jax.tree.leaves(engine.kv_pool)[0]
  assert leaf.sharding.spec[2] == 'tensor'  # the pool [pages, page_size, 2K, H] is split over the kv heads
  outputs = engine.generate(prompts, GREEDY)
  for prompt, out in zip(prompts, outputs):
    assert out.outputs[0].token_ids == reference_greedy(CFG, params, prompt, 10)[0]


@pytest.mark.parametrize('variant', [
    dict(ffn='moe', num_experts=4, experts_per_token=2, expert_ffn_dim=16, moe_compute='dense'),
    dict(sliding_window=6),
    dict(lora_rank=4, lora_targets=('q', 'v', 'up')),
    dict(qkv_bias=True, qk_norm=True, num_kv_heads=1),
], ids=['moe', 'sliding-window', 'lora', 'bias-qknorm-mqa'])
def test_every_model_kind_decodes_like_its_full_forward(variant):
  cfg = dataclasses.replace(CFG, **variant)
  params = _params(cfg)
  if cfg.lora_rank:  # adapters away from zero, so they matter
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 if 'lora_b' in jax.tree_util.keystr(path) else x, params)
  prompts = _prompts([14, 4], seed=13)
  outputs = Engine(cfg, params, config=SMALL).generate(prompts, GREEDY)
  for prompt, out in zip(prompts, outputs):
    assert out.outputs[0].token_ids == reference_greedy(cfg, params, prompt, 10)[0]


def test_seeded_sampling_is_the_same_alone_and_in_any_batch():
  params = _params(CFG)
  prompt = _prompts([6], seed=2)[0]
  sampled = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=20, seed=1234)
  engine = Engine(CFG, params, config=SMALL)
  alone = engine.generate([prompt], sampled)[0].outputs[0].token_ids
  others = [SamplingParams(max_tokens=8, temperature=0.0), SamplingParams(max_tokens=5, temperature=2.0, seed=9)]
  mixed = engine.generate([_prompts([9], 4)[0], prompt, _prompts([3], 5)[0]], [others[0], sampled, others[1]])
  assert mixed[1].outputs[0].token_ids == alone
  several = engine.generate([prompt], dataclasses.replace(sampled, n=3))[0]
  assert [c.index for c in several.outputs] == [0, 1, 2]
  assert several.outputs[0].token_ids == alone  # completion i draws with seed + i
  assert len({tuple(c.token_ids) for c in several.outputs}) > 1
  # top_k=1 leaves one token: the greedy one, whatever the temperature
  top1 = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=3))[0]
  assert top1.outputs[0].token_ids == reference_greedy(CFG, params, prompt, 8)[0]


def test_penalties_match_a_numpy_reference():
  params = _params(CFG)
  prompt = _prompts([5], seed=21)[0]
  settings = SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=0.7, frequency_penalty=1.3)
  got = Engine(CFG, params, config=SMALL).generate([prompt], settings)[0].outputs[0].token_ids
  tokens, generated = list(prompt), []
  for _ in range(12):
    logits = last_logits(CFG, params, tokens)
    counts = np.bincount(generated, minlength=CFG.vocab_size)
    token = int(np.argmax(logits - 0.7 * (counts > 0) - 1.3 * counts))
    tokens.append(token)
    generated.append(token)
  assert got == generated


class CharTokenizer:
  """Token t is the character chr(ord('a') + t % 26); 0 is EOS."""
  eos_id, pad_id, vocab_size = 0, 0, 61

  def encode(self, text):
    return [ord(c) - ord('a') + 1 for c in text]

  def decode(self, ids):
    return ''.join(chr(ord('a') + t % 26) for t in ids if t != 0)


def test_stop_strings_stop_tokens_and_eos():
  params = _params(CFG)
  prompt = _prompts([8], seed=17)[0]
  tokens = reference_greedy(CFG, params, prompt, 10)[0]
  tokenizer = CharTokenizer()
  engine = Engine(CFG, params, tokenizer, config=SMALL, eos_id=-1)
  text = tokenizer.decode(tokens)
  stop = text[4:6]
  out = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, stop=[stop]))[0].outputs[0]
  assert out.finish_reason == 'stop' and out.stop_reason == stop and out.text == text[:text.find(stop)]
  out = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[tokens[3]]))[0]
  completion = out.outputs[0]
  assert completion.token_ids == tokens[:tokens.index(tokens[3]) + 1] and completion.stop_reason == tokens[3]
  eos_engine = Engine(CFG, params, tokenizer, config=SMALL, eos_id=tokens[2])
  completion = eos_engine.generate([prompt], GREEDY)[0].outputs[0]
  assert completion.token_ids == tokens[:tokens.index(tokens[2]) + 1] and completion.finish_reason == 'stop'
  ignored = eos_engine.generate([prompt], dataclasses.replace(GREEDY, ignore_eos=True))[0].outputs[0]
  assert ignored.token_ids == tokens


def test_abort_frees_pages_and_errors_name_the_field():
  params = _params(CFG)
  engine = Engine(CFG, params, config=dataclasses.replace(SMALL, max_queue=3))
  engine.add_request(_prompts([20], 1)[0], GREEDY, 'long')
  engine.step()
  assert engine.stats()['pages_used'] > 0
  engine.abort('long')
  assert engine.stats()['pages_used'] == 0 and not engine.has_unfinished()
  with pytest.raises(RequestError, match='max_tokens') as error:
    engine.add_request(_prompts([40], 1)[0], SamplingParams(max_tokens=20))
  assert error.value.field == 'max_tokens'
  with pytest.raises(RequestError, match='prompt'):
    engine.add_request([], GREEDY)
  with pytest.raises(SamplingError, match='top_p'):
    SamplingParams(top_p=0.0)
  for _ in range(3):
    engine.add_request([1, 2], GREEDY)
  with pytest.raises(QueueFullError):
    engine.add_request([1, 2], GREEDY)


def test_async_engine_streams_and_a_caller_leaving_early_frees_its_pages():
  params = _params(CFG)
  prompts = _prompts([9, 12], seed=19)
  engine = Engine(CFG, params, config=SMALL)
  async_engine = AsyncEngine(engine).start()

  async def full(prompt):
    updates = [u async for u in async_engine.generate(prompt, GREEDY)]
    return updates

  async def leave_after_two(prompt):
    seen = 0
    async for _ in async_engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0)):
      seen += 1
      if seen == 2:
        break
    return seen

  async def main():
    results = await asyncio.gather(full(prompts[0]), leave_after_two(prompts[1]))
    for _ in range(100):  # the abort reaches the engine thread between steps
      if engine.stats()['pages_used'] == 0 and not engine.has_unfinished():
        break
      await asyncio.sleep(0.05)
    await async_engine.shutdown()
    return results

  updates, seen = asyncio.run(main())
  assert seen == 2
  assert updates[-1].finished and updates[-1].outputs[0].token_ids == reference_greedy(CFG, params, prompts[0], 10)[0]
  assert len(updates) > 1  # streamed, not one final update
  assert engine.stats()['pages_used'] == 0 and not engine.has_unfinished()


def test_prefill_plan_stays_within_its_slot_budget_padding_included():
  """The scheduler counts a step's prefill as the engine compiles it (rows and width bucketed): chunks that would
  widen the batch or double its rows past max_prefill_tokens slots are shortened or wait; decode rows always run;
  the first chunk of a step takes the budget even when it is below the narrowest bucket."""
  from llm_jax.serving.pages import PagePool
  from llm_jax.serving.scheduler import Scheduler, Sequence

  def plan_for(prompts, **limits):
    scheduler = Scheduler(PagePool(64, 4, prefix_caching=False), **limits)
    seqs = [Sequence(None, 0, list(range(n)), n, 0) for n in prompts]
    for seq in seqs:
      scheduler.add(seq)
    plan = scheduler.schedule()
    return [(seqs.index(seq), start, count) for seq, start, count in plan.prefill], plan

  limits = dict(max_seqs=4, max_chunk=8, max_prefill_tokens=16)
  chunks, _ = plan_for([20, 5, 3], **limits)
  assert chunks == [(0, 0, 8), (1, 0, 5)]  # 2 rows x width 8 = 16 slots; a third row would make 4 x 8 = 32
  chunks, _ = plan_for([3, 2, 2, 2, 2], max_seqs=8, max_chunk=4, max_prefill_tokens=16)
  assert chunks == [(0, 0, 3), (1, 0, 2), (2, 0, 2), (3, 0, 2)]  # 4 rows x width 4 (the narrowest: max_chunk)
  chunks, _ = plan_for([30], max_seqs=4, max_chunk=8, max_prefill_tokens=5)
  assert chunks == [(0, 0, 5)]  # a budget below the narrowest bucket still progresses
  scheduler = Scheduler(PagePool(64, 4, prefix_caching=False), **limits)
  decoding = Sequence(None, 0, list(range(9)), 8, 0)
  scheduler.add(decoding)
  scheduler.schedule()
  decoding.computed = 8  # its prompt is in: one token to decode
  for n in (20, 20, 20):
    scheduler.add(Sequence(None, 0, list(range(n)), n, 0))
  plan = scheduler.schedule()
  assert plan.decode == [decoding] and [count for _, _, count in plan.prefill] == [8, 8]
  assert scheduler.prefill_slots([8, 8]) == 16 and scheduler.prefill_slots([8, 8, 1]) == 32


def test_compute_dtype_auto_is_float32_on_cpu_and_an_explicit_one_is_kept():
  import jax.numpy as jnp
  bf16_model = dataclasses.replace(CFG, dtype='bfloat16')
  narrow = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(CFG))  # weights stored in bfloat16
  engine = Engine(bf16_model, narrow, config=SMALL)
  assert engine.model_config.dtype == 'float32'  # XLA:CPU would convert every dot's operands on every step
  assert {x.dtype for x in jax.tree.leaves(engine.params)} == {jnp.dtype('float32')}  # widened once
  assert {x.dtype for x in jax.tree.leaves(engine.kv_pool)} == {jnp.dtype('float32')}
  # the float32 engine on bfloat16-stored weights decodes like the float32 model on the same (rounded) weights
  prompt = _prompts([7], seed=5)[0]
  widened = jax.tree.map(lambda x: x.astype(jnp.float32), narrow)
  assert engine.generate([prompt], GREEDY)[0].outputs[0].token_ids == reference_greedy(CFG, widened, prompt, 10)[0]
  kept = Engine(bf16_model, narrow, config=dataclasses.replace(SMALL, dtype='bfloat16'))
  assert kept.model_config.dtype == 'bfloat16'
  assert {x.dtype for x in jax.tree.leaves(kept.kv_pool)} == {jnp.dtype('bfloat16')}
  with pytest.raises(RequestError, match='engine.dtype'):
    Engine(CFG, narrow, config=dataclasses.replace(SMALL, dtype='fp8'))
