"""Sample completions from a trained workdir:

  python -m llm_jax.generate --workdir=DIR --prompt="def main(" [--prompt=... | --prompts_file=F]
      [--max_new_tokens=64 --temperature=0.8 --top_k=0 --top_p=0.95 --seed=0] [--chat | --nochat]

Loads the newest intact checkpoint (a damaged newer one is skipped with a one-line warning) and the tokenizer of
the workdir (checked against the checkpoint's fingerprint), writes nothing to the workdir, decodes all prompts
as one batch with the KV cache (llm_jax.decoding), and prints each completion after a
`=== prompt i ===` header. A workdir fine-tuned on data.source=sft_jsonl is prompted through its chat template
(the tokenizer's own Jinja template when it has one, e.g. an imported Llama 3 / Qwen2.5 / Mistral Instruct, with
its generation prompt; else the built-in `<|user|>` turn + `<|assistant|>` header: llm_jax.data.sft.encode_prompt),
other workdirs with the raw text; --chat / --nochat override that (--chat on an imported Instruct model). `run()` does the work and is what tests call.
"""

from __future__ import annotations

import sys
from typing import Sequence
from llm_jax import cli
from llm_jax import storage


def read_prompts(path: str) -> list[str]:
  """One prompt per non-blank line; a literal backslash-n in a line becomes a newline."""
  try:
    lines = storage.read_text(path).splitlines()
  except OSError as e:
    raise FileNotFoundError(f'--prompts_file {path}: cannot read it ({e.strerror or e})') from None
  prompts = [line.replace('\\n', '\n') for line in lines if line.strip()]
  if not prompts:
    from llm_jax import decoding  # pylint: disable=g-import-not-at-top
    raise decoding.PromptError(f'--prompts_file {path}: no prompts (every line is blank)')
  return prompts


def run(workdir: str, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0,
        top_p: float = 0.95, seed: int = 0, step: int | None = None, tokenizer_path: str = '',
        devices=None, chat: bool | None = None) -> list[str]:
  """Completions (generated text only) of `prompts` by the workdir's checkpoint. `chat` None: the chat template
  exactly when the workdir trained on sft_jsonl."""
  from llm_jax import decoding, serving, workdir as workdir_lib  # after flag parsing: keeps --help fast
  sampling = serving.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
  if not prompts:
    raise decoding.PromptError('no prompts: pass --prompt or --prompts_file')
  decoding.check_prompts(prompts, max_seq_len=sys.maxsize)  # an empty prompt fails before the model is loaded
  loaded = workdir_lib.load_workdir(workdir, step=step, tokenizer_path=tokenizer_path, devices=devices)
  return serving.complete_workdir(loaded, prompts, max_new_tokens, sampling, chat)


def _main():
  """The command line. Flags are defined here, not at import, so that tests can import every job together."""
  from absl import app, flags


  workdir = flags.DEFINE_string('workdir', None, 'Training workdir: its newest intact checkpoint and tokenizer are used; '
                                'nothing is written to it (a read-only workdir works).')
  prompt = flags.DEFINE_multi_string('prompt', [], 'A prompt to complete; repeat the flag for several.')
  prompts_file = flags.DEFINE_string('prompts_file', None, 'Text file with one prompt per line (blank lines '
                                     'skipped; "\\n" in a line stands for a newline).')
  max_new_tokens = flags.DEFINE_integer('max_new_tokens', 64, 'Most tokens to generate per prompt (fewer at EOS).')
  temperature = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 = greedy.')
  top_k = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens only; 0 = no limit.')
  top_p = flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling: the smallest set of most likely tokens with this '
                             'total probability; 1 = no limit.')
  seed = flags.DEFINE_integer('seed', 0, 'Random seed of sampling; the same seed gives the same text.')
  step = flags.DEFINE_integer('step', None, 'Checkpoint step to load (default: the newest intact one).')
  tokenizer = flags.DEFINE_string('tokenizer', '', 'Tokenizer (SentencePiece .model, tokenizer.json, or a directory '
                                  'with one) to use instead of the workdir\'s (it must be the one the checkpoint was '
                                  'trained with).')
  chat = flags.DEFINE_bool('chat', None, 'Wrap prompts in the SFT chat template (default: only for a workdir '
                           'fine-tuned on data.source=sft_jsonl).')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not workdir.value:
      raise app.UsageError('--workdir is required')
    prompts = list(prompt.value) + (read_prompts(prompts_file.value) if prompts_file.value else [])
    completions = run(workdir.value, prompts, max_new_tokens.value, temperature.value, top_k.value, top_p.value,
                      seed.value, step.value, tokenizer.value, chat=chat.value)
    for i, (text, completion) in enumerate(zip(prompts, completions)):
      print(f'=== prompt {i} ===\n{text}{completion}', flush=True)

  cli.run(main)


if __name__ == '__main__':
  _main()
