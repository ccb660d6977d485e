"""Continuous batching: which sequences run in the next step, with how many tokens, on which pages.

A sequence is one completion: its `tokens` (prompt, then what it generated) and how many of them have their
keys and values in its pages (`computed`). Each step computes, for every running sequence, the tokens it has not
computed yet: one token for a sequence that is decoding (the token it sampled last step), a chunk of at most
`max_chunk` tokens for one that is prefilling, so a long prompt never stalls the others for more than a chunk. A
chunk that reaches the end of the tokens samples the next one.

Admission, in arrival order, while a batch slot is free and the pool has pages for the first chunk (beyond what
the running sequences need for their next token). On admission the prefix cache gives the first full pages of
the tokens that it holds (never the page of the last token: its logits are needed).

When a running sequence needs a page and none is left, the most recently admitted running sequence is
preempted: its pages are released and it goes back to the front of the queue, keeping its tokens, to be
recomputed when pages free up (vLLM's "recompute" preemption). A sequence never needs more pages than the pool
has (the engine refuses such a request), so the oldest sequence always progresses: no deadlock, no crash.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from llm_jax.serving.pages import PagePool

MIN_CHUNK_BUCKET = 16  # the narrowest compiled prefill chunk


def bucket(n: int, floor: int, cap: int) -> int:
  """The compiled size for n: the smallest power of two >= max(n, floor), but at most cap (and never below n)."""
  return max(n, min(1 << max(max(n, floor) - 1, 0).bit_length(), cap))


@dataclasses.dataclass(eq=False)
class Sequence:
  """One completion of a request (n > 1: n of them)."""
  request: Any  # the engine's request record
  index: int  # which completion of the request
  tokens: list[int]  # prompt, then the generated tokens
  num_prompt: int
  seed: int
  computed: int = 0  # tokens whose K/V sit in `pages`
  pages: list[int] = dataclasses.field(default_factory=list)
  keys: list[bytes] = dataclasses.field(default_factory=list)  # prefix-cache keys of the first full pages
  cached: int = 0  # prompt tokens that came from the prefix cache at (first) admission
  logprobs: list[dict[int, float]] | None = None
  finish_reason: str | None = None
  stop_reason: str | int | None = None
  text: str = ''
  preemptions: int = 0
  ever_admitted: bool = False
  prefix_cache: bool = True  # may take cached pages (not when the prompt's logprobs are asked for)

  @property
  def generated(self) -> list[int]:
    return self.tokens[self.num_prompt:]

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None


@dataclasses.dataclass
class Plan:
  """One step: (sequence, first token, token count) chunks that prefill, and sequences that decode one token."""
  prefill: list[tuple[Sequence, int, int]]
  decode: list[Sequence]

  def __bool__(self):
    return bool(self.prefill or self.decode)


class Scheduler:

  def __init__(self, pool: PagePool, max_seqs: int, max_chunk: int, max_prefill_tokens: int):
    self.pool = pool
    self.max_seqs = max_seqs
    self.max_chunk = max_chunk
    self.max_prefill_tokens = max_prefill_tokens
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[Sequence] = []  # in admission order
    self.preemptions = 0

  def add(self, seq: Sequence) -> None:
    self.waiting.append(seq)

  def remove(self, seq: Sequence) -> None:
    """A finished or aborted sequence leaves, releasing its pages."""
    if seq in self.running:
      self.running.remove(seq)
    elif seq in self.waiting:
      self.waiting.remove(seq)
    self.pool.release(seq.pages)
    seq.pages, seq.keys, seq.computed = [], [], 0

  def _pages_for(self, seq: Sequence, end: int) -> bool:
    """Allocates pages until `seq` can hold tokens [0, end); False if the pool ran out (pages kept so far)."""
    while len(seq.pages) * self.pool.page_size < end:
      page = self.pool.allocate()
      if page is None:
        return False
      seq.pages.append(page)
    return True

  def _preempt(self, seq: Sequence) -> None:
    self.running.remove(seq)
    self.pool.release(seq.pages)
    seq.pages, seq.keys, seq.computed = [], [], 0
    seq.preemptions += 1
    self.preemptions += 1
    self.waiting.appendleft(seq)

  def prefill_slots(self, counts: list[int]) -> int:
    """Token slots of the compiled prefill batch for chunks of these lengths: rows and width bucketed (as the
    engine pads them), so a step's prefill compute counts its padding."""
    return bucket(len(counts), 1, self.max_seqs) * self.chunk_width(max(counts))

  def chunk_width(self, longest: int) -> int:
    """The compiled width of a prefill batch whose longest chunk has `longest` tokens."""
    return bucket(longest, min(MIN_CHUNK_BUCKET, self.max_chunk), self.max_chunk)

  def _chunk(self, counts: list[int], remaining: int) -> int:
    """Tokens of the next prefill chunk: as many as fit beside `counts` (this step's chunks so far) without the
    bucketed batch exceeding max_prefill_tokens slots; the first chunk of a step may take the whole budget in
    tokens (a budget below the narrowest bucket still makes progress). 0 = none fits."""
    want = min(remaining, self.max_chunk)
    if not counts:
      return min(want, self.max_prefill_tokens)
    while want > 0 and self.prefill_slots(counts + [want]) > self.max_prefill_tokens:
      want = min(want - 1, self.max_prefill_tokens // bucket(len(counts) + 1, 1, self.max_seqs))
    return want

  def schedule(self) -> Plan:
    """Decode tokens for every running sequence that has one; prefill chunks in admission order while the
    step's prefill batch, padded to its compiled shape, stays within max_prefill_tokens slots (a chunk that
    would widen the batch or double its rows past it is shortened or waits for the next step)."""
    plan = Plan([], [])
    counts: list[int] = []  # this step's prefill chunk lengths
    for seq in list(self.running):
      if seq not in self.running:  # preempted by an older sequence in this loop
        continue
      remaining = len(seq.tokens) - seq.computed
      count = 1 if remaining == 1 else self._chunk(counts, remaining)
      if count <= 0:
        continue
      while not self._pages_for(seq, seq.computed + count):
        victim = self.running[-1]
        self._preempt(victim)
        if victim is seq:
          break
      if seq not in self.running:
        break  # it preempted itself: every newer sequence is gone too
      if remaining == 1:
        plan.decode.append(seq)
      else:
        plan.prefill.append((seq, seq.computed, count))
        counts.append(count)
    while self.waiting and len(self.running) < self.max_seqs and self._chunk(counts, 2) > 0:
      seq = self.waiting[0]
      if not seq.pages and seq.prefix_cache:  # prefix cache: full pages of the tokens, never the last token's page
        seq.pages, seq.keys = self.pool.lookup(seq.tokens, (len(seq.tokens) - 1) // self.pool.page_size)
        seq.computed = len(seq.pages) * self.pool.page_size
        if not seq.ever_admitted:
          seq.cached = seq.computed
      remaining = len(seq.tokens) - seq.computed
      count = 1 if remaining == 1 else self._chunk(counts, remaining)  # >= 1: a chunk fits (the loop's test)
      if not self._pages_for(seq, seq.computed + count):
        self.pool.release(seq.pages)  # wait for pages; give the cached ones back meanwhile
        seq.pages, seq.keys, seq.computed = [], [], 0
        break
      self.waiting.popleft()
      seq.ever_admitted = True
      self.running.append(seq)
      if remaining == 1:
        plan.decode.append(seq)
      else:
        plan.prefill.append((seq, seq.computed, count))
        counts.append(count)
    return plan

  def register_pages(self, seq: Sequence) -> None:
    """Puts the sequence's newly completed full pages into the prefix cache."""
    size = self.pool.page_size
    while (len(seq.keys) + 1) * size <= seq.computed:
      i = len(seq.keys)
      parent = seq.keys[-1] if seq.keys else b''
      seq.keys.append(self.pool.register(seq.pages[i], parent, seq.tokens[i * size:(i + 1) * size]))
