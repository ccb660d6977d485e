"""What the engine hands back: one `RequestOutput` per request and step, holding every completion so far.

Shapes as vLLM's (`RequestOutput.outputs[i]` is completion i of a request with n > 1), so code written against
it reads the same. Logprobs are dicts {token id: logprob}, the chosen token always among the keys.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
  index: int  # which of the request's n completions
  token_ids: list[int]  # every token generated so far (a stop token id included; a stop string's tokens not)
  text: str  # their text, ending before a stop string
  logprobs: list[dict[int, float]] | None  # one dict a generated token (SamplingParams.logprobs set), else None
  finish_reason: str | None = None  # None while running; 'stop' (EOS, stop token or string), 'length', 'abort'
  stop_reason: str | int | None = None  # the stop string or token id that ended it, if any


@dataclasses.dataclass
class RequestOutput:
  request_id: str
  prompt_token_ids: list[int]
  prompt_logprobs: list[dict[int, float] | None] | None  # one entry a prompt token (None for the first)
  outputs: list[CompletionOutput]
  finished: bool  # every completion has a finish_reason
  num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (of the first completion)
  metrics: dict = dataclasses.field(default_factory=dict)  # arrival, first_token, finished times (monotonic s)
