"""The config of an existing workdir, e.g. one `convert from_hf` made: `--config=experiments/imported.py:W`.

Starts from W's config.json (model fields of the imported Llama 3.x / Qwen2.5 / Mistral model, its tokenizer as
data.tokenizer_path), so a fine-tuning or continued pre-training run from `--config.train.init_from=W` needs only
its data, schedule, LoRA and mesh overrides (docs/finetune.md). Without a workdir: the base config.
"""

from llm_jax import config as base


def get_config(workdir: str = ''):
  return base.load_workdir_config(workdir) if workdir else base.get_config()
