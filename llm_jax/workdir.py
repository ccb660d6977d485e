"""A trained workdir's model for inference (generate, evaluate, the notebook, benchmarks).

  load_workdir(workdir, ...) -> LoadedModel(runtime, params, tokenizer, step)
  inference_config(config, num_devices)   the run's config made valid for loading on the devices here

Loading is not training: the run's global batch, gradient accumulation and mesh were chosen for the machine it
trained on. `inference_config` keeps everything that fixes the model and the data, and changes only:

  train.grad_accum_steps   1 (nothing is accumulated when scoring)
  eval.task_file           '' (the training loop's task file need not exist any more; evaluate takes --task_file)
  mesh                     the run's mesh when it fits the devices here, else data=-1 expert=fsdp=tensor=1
                           (parameters replicated, batches split over every device)
  data.global_batch_size   unchanged when data*expert*fsdp of that mesh divides it; else the largest multiple
                           of it not above it (at least data*expert*fsdp). Perplexity (evaluate) is then measured on
                           batches of that size, so its batches hold other rows than the run's eval batches.

A LoRA workdir loads with its adapters: the parameter tree has the lora_a/lora_b leaves and the model config
(TransformerConfig.from_config) has the same lora rank, so generation and scoring run base + adapters unmerged
(llm_jax.model.lora.merge gives the same function as plain weights, which convert.to_hf exports).

This module is job-side: it builds an inference `llm_jax.runtime.Runtime` (mesh, model, parameter shardings, eval
and scoring steps; no optimizer, no train step) and loads the parameters onto it; train never imports it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence

import jax

from llm_jax import checkpoint
from llm_jax import config as config_lib
from llm_jax import runtime as runtime_lib
from llm_jax import storage
from llm_jax import tasks
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.model import TransformerConfig


@dataclasses.dataclass
class LoadedModel:
  """A workdir's checkpoint, ready to decode or score: `runtime` holds the config, mesh, model and the steps."""
  runtime: runtime_lib.Runtime  # built from the (inference) config: no optimizer, no train step
  params: Any  # parameters on the runtime's mesh (with adapters for a LoRA run)
  tokenizer: Any  # llm_jax.data.tokenizer.Tokenizer, or None when the workdir has none (synthetic data)
  step: int  # the checkpoint's step

  @property
  def config(self):
    return self.runtime.config

  @property
  def model_config(self) -> TransformerConfig:
    return self.runtime.model_config

  def prompt_encoder(self, chat: bool | None = None) -> Callable[[str], list[int]]:
    """text -> prompt tokens: the chat template when the run fine-tuned on sft_jsonl (or chat=True)."""
    return tasks.prompt_encoder(self.config, self.tokenizer, chat)


def inference_config(config, num_devices: int):
  """A copy of `config` whose batch, accumulation and mesh are valid for `num_devices` (see the module doc)."""
  config = copy.deepcopy(config)
  config.train.grad_accum_steps = 1
  config.eval.task_file = ''  # the training loop's task file: evaluate passes its own (--task_file)
  try:
    mesh = config_lib.resolve_mesh_shape(config.mesh, num_devices)
  except config_lib.ConfigError:
    config.mesh.data, config.mesh.expert, config.mesh.fsdp, config.mesh.context, config.mesh.tensor = -1, 1, 1, 1, 1
    mesh = config_lib.resolve_mesh_shape(config.mesh, num_devices)
  shards = mesh['data'] * mesh['expert'] * mesh['fsdp']
  batch = config.data.global_batch_size
  if batch % shards:
    config.data.global_batch_size = max(shards, batch // shards * shards)
  return config


def load_workdir(workdir: str, config=None, step: int | None = None, tokenizer_path: str = '', devices=None,
                 need_tokenizer: bool = True) -> LoadedModel:
  """The newest intact (or `step`'s) parameters of a workdir, sharded as its config says, and its tokenizer.

  `config` defaults to the workdir's config.json; it is passed through `inference_config` for the devices
  here. Errors, each one message naming the path: unknown workdir, no config.json, no checkpoint, no tokenizer
  (when `need_tokenizer`), a tokenizer other than the checkpoint's.
  """
  storage.check_readable(workdir)
  if not storage.isdir(workdir):
    raise FileNotFoundError(f'--workdir {workdir}: no such directory')
  config = config if config is not None else config_lib.load_workdir_config(workdir)
  if checkpoint.latest_step(workdir) is None:
    raise FileNotFoundError(f'--workdir {workdir}: no complete checkpoint under {checkpoint.checkpoint_dir(workdir)} '
                            f'(train first, or wait for the first checkpoint)')
  tokenizer = None
  path = tokenizer_path or tokenizer_lib.workdir_tokenizer(workdir) or storage.join(workdir,
                                                                                     tokenizer_lib.WORKDIR_MODEL)
  if storage.exists(path):
    tokenizer = (tokenizer_lib.load_from_workdir(workdir, config.data.add_bos) if not tokenizer_path else
                 tokenizer_lib.load(path, config.data.add_bos))
    tokenizer_lib.check_vocab(config, tokenizer)
  elif need_tokenizer or tokenizer_path:
    raise FileNotFoundError(f'{path}: no tokenizer (a run on data.source=synthetic has none); pass a tokenizer '
                            f'file or use a workdir trained on text')
  devices = list(devices if devices is not None else jax.devices())
  config = inference_config(config, len(devices))
  runtime = runtime_lib.Runtime(config, workdir, devices)
  # step None: the newest intact step (a damaged newer one is skipped with a one-line warning)
  params, meta = checkpoint.load_params(workdir, runtime.abstract_params(), step)
  step = meta['step']
  recorded = meta.get('tokenizer_fingerprint')
  if tokenizer is not None and recorded:
    tokenizer_lib.check_fingerprint(tokenizer, recorded, f'the checkpoint {checkpoint.checkpoint_dir(workdir)}/{step}')
  return LoadedModel(runtime=runtime, params=params, tokenizer=tokenizer, step=int(step))
