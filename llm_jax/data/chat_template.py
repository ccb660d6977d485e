"""Chat templates shipped with Hugging Face tokenizers (Jinja in tokenizer_config.json or chat_template.jinja).

  render(tokenizer, messages, add_generation_prompt=False) -> str       the conversation as the template writes it
  tokens_and_loss(tokenizer, messages) -> (ids, loss)                   SFT: loss on the assistant spans only
  prompt_tokens(tokenizer, messages) -> ids                             generation: up to the assistant header

Rendering follows transformers' `apply_chat_template`: a sandboxed Jinja environment with trim_blocks and
lstrip_blocks, the loop-control extension, `raise_exception`, `strftime_now` and a `tojson` filter, and the
variables messages, add_generation_prompt, bos_token and eos_token. Ids are those of the tokenizer on the
rendered text (special tokens written by the template are recognised), which is what
`apply_chat_template(tokenize=True)` gives.

Loss spans, exactly as rendered: for assistant message i, the text the template writes for messages[:i] with
the generation prompt is a prefix P_i, and the text for messages[:i+1] a longer prefix Q_i of the whole
conversation; the span [len(P_i), len(Q_i)) without trailing whitespace is the answer with whatever the
template closes the turn with (its end-of-turn token, not the line break after it: the span transformers'
`{% generation %}` markers give in the templates that have them). A token is a loss token when its first character lies in a span (token offsets of the
`tokenizers` library). A template that does not render conversations incrementally (an earlier turn rewritten
when later ones are added) is an error naming the message, never a silently wrong mask.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Sequence

from llm_jax.errors import UserError


class ChatTemplateError(UserError, ValueError):
  """A chat template cannot render a conversation, or not incrementally; the message names it."""


@functools.lru_cache(maxsize=8)
def _compile(template: str):
  import jinja2  # lazily: only tokenizers with a chat template need it
  from jinja2 import sandbox

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  from jinja2 import ext, nodes

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers) renders its body."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
      return nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[Generation, 'jinja2.ext.loopcontrols'])
  env.filters['tojson'] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
      x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f'chat template: not valid Jinja ({e})') from None


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
  """The conversation as the tokenizer's chat template writes it."""
  import jinja2
  template = _compile(tokenizer.chat_template)
  try:
    return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, tools=None,
                           documents=None, bos_token=tokenizer.bos_token or '', eos_token=tokenizer.eos_token or '')
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f'chat template of {tokenizer.path}: {e}') from None


def assistant_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
  """(the rendered conversation, the character span of each assistant turn in it), see the module doc."""
  text = render(tokenizer, messages)
  spans = []
  for i, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    before = render(tokenizer, messages[:i], add_generation_prompt=True)
    through = render(tokenizer, messages[:i + 1])
    if not (through.startswith(before) and text.startswith(through)):
      raise ChatTemplateError(f'chat template of {tokenizer.path}: messages[{i}] (assistant): the template does not '
                              'render the conversation incrementally (the text before this answer changes when '
                              'it is added), so the answer tokens cannot be located')
    end = len(through.rstrip())  # the line break after an end-of-turn token is layout, not the answer
    spans.append((len(before), max(end, len(before))))
  return text, spans


def tokens_and_loss(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
  """Token ids of the rendered conversation and, per token, whether it is in an assistant span."""
  text, spans = assistant_spans(tokenizer, messages)
  ids, offsets = tokenizer.encode_with_offsets(text)
  loss = [any(start <= first < end for start, end in spans) for first, _ in offsets]
  return ids, loss


def prompt_tokens(tokenizer, messages: Sequence[dict]) -> list[int]:
  """Token ids a generation starts from: the conversation and the template's assistant header."""
  return tokenizer.encode(render(tokenizer, messages, add_generation_prompt=True))
