"""LM1B (the One Billion Word benchmark) from TFDS, the task of flax's lm1b example, on the base LLaMA-style model.

Needs the dataset prepared once where TFDS finds it (`tfds.builder('lm1b').download_and_prepare()`, or set
--config.data.tfds_data_dir); then `python -m llm_jax.data.prepare --config=experiments/lm1b.py --workdir=...`
trains a 32k BPE tokenizer on a sample and tokenizes the ~30M sentences. Sentences are short (~27 tokens), so a
256-token row packs about nine of them; attention stays within each sentence.
"""

from llm_jax import config as base


def get_config():
  c = base.get_config()
  c.model.vocab_size = 32000
  c.model.max_seq_len = 512
  c.data.source = 'tfds'
  c.data.tfds_name = 'lm1b'
  c.data.tfds_text_key = 'text'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'  # lm1b has no validation split
  c.data.min_doc_chars = 8  # sentences are short; keep all but fragments
  c.data.seq_len = 256
  c.data.global_batch_size = 256
  c.train.steps = 100_000
  c.train.learning_rate = 6e-4
  c.train.warmup_steps = 2000
  c.eval.every = 2000
  c.eval.steps = 50
  c.checkpoint.every = 5000
  return c
