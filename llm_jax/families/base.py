"""What every Hugging Face model family is made of: its tensor-name map (HF name -> our parameter path and
layout transform), its config translation both ways, and the checks that refuse what llm_jax does not compute.

A family module (llm_jax/families/<model_type>.py) builds one `Family` from these parts; `families.FAMILIES` lists
them. The three LLaMA-like families share the tensor layout below (`LLAMA_TENSORS`); a family with other tensors
(a mixture of experts) gives its own.

Layouts: a torch `nn.Linear` stores [out, in]; our kernels are [in..., out...] with heads split out, e.g. q_proj
[N*H, D] <-> attn/q/kernel [D, N, H] and o_proj [D, N*H] <-> attn/o/kernel [N, H, D]. With scanned layers every
per-layer leaf has a leading [L] axis, filled (or read) one layer at a time (`Slot.layer`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np

from llm_jax import config as config_lib
from llm_jax.errors import UserError
from llm_jax.model import head_dim_of, layer_location
from llm_jax.model.layer_pattern import LayerKind, kind_of_layer, parse_pattern


class ConversionError(UserError, ValueError):
  """The checkpoint or workdir cannot be converted; the message names the file, field or tensor."""


# ------------------------------------------------------------------------------------------- tensor layouts


@dataclasses.dataclass(frozen=True)
class Same:
  """The tensor has the same layout on both sides (embeddings, norm scales)."""

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape)

  def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return x

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class Linear:
  """torch nn.Linear weight [out, in] <-> our kernel [*in_shape, *out_shape], whose first `in_dims` axes are inputs."""
  in_dims: int = 1

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (math.prod(shape[self.in_dims:]), math.prod(shape[:self.in_dims]))

  def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return x.T.reshape(shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return x.reshape(math.prod(x.shape[:self.in_dims]), -1).T


@dataclasses.dataclass(frozen=True)
class Flat:
  """A bias [out] <-> ours [*out_shape] (q/k/v biases [N*H] <-> [N,H])."""

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (math.prod(shape),)

  def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return x.reshape(shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return x.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Tensor:
  hf: str  # HF name; per-layer names have '{i}' for the layer index
  ours: tuple[str, ...]  # path in our params tree (per-layer: below the layer's subtree)
  transform: Same | Linear | Flat


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """A family's tensors: outside the layers, in every layer, the q/k/v biases when config.model.qkv_bias, and
  per expert (a mixture of experts: HF names with '{j}' for the expert, our leaf [E,...] filled one expert at a
  time, `Slot.expert`)."""
  model: tuple[Tensor, ...]
  layer: tuple[Tensor, ...]
  qkv_bias: tuple[Tensor, ...] = ()
  experts: tuple[Tensor, ...] = ()


LLAMA_TENSORS = TensorMap(
    model=(
        Tensor('model.embed_tokens.weight', ('embed', 'embedding'), Same()),  # [V,D] = [V,D]
        Tensor('model.norm.weight', ('final_norm', 'scale'), Same()),  # [D]
        Tensor('lm_head.weight', ('lm_head', 'kernel'), Linear()),  # [V,D] -> [D,V]; absent when tied
    ),
    layer=(
        Tensor('model.layers.{i}.input_layernorm.weight', ('attn_norm', 'scale'), Same()),  # [D]
        Tensor('model.layers.{i}.self_attn.q_proj.weight', ('attn', 'q', 'kernel'), Linear()),  # [N*H,D] -> [D,N,H]
        Tensor('model.layers.{i}.self_attn.k_proj.weight', ('attn', 'k', 'kernel'), Linear()),  # [K*H,D] -> [D,K,H]
        Tensor('model.layers.{i}.self_attn.v_proj.weight', ('attn', 'v', 'kernel'), Linear()),  # [K*H,D] -> [D,K,H]
        Tensor('model.layers.{i}.self_attn.o_proj.weight', ('attn', 'o', 'kernel'), Linear(in_dims=2)),  # [D,N*H]->[N,H,D]
        Tensor('model.layers.{i}.post_attention_layernorm.weight', ('mlp_norm', 'scale'), Same()),  # [D]
        Tensor('model.layers.{i}.mlp.gate_proj.weight', ('mlp', 'gate', 'kernel'), Linear()),  # [F,D] -> [D,F]
        Tensor('model.layers.{i}.mlp.up_proj.weight', ('mlp', 'up', 'kernel'), Linear()),  # [F,D] -> [D,F]
        Tensor('model.layers.{i}.mlp.down_proj.weight', ('mlp', 'down', 'kernel'), Linear()),  # [D,F] -> [F,D]
    ),
    qkv_bias=(
        Tensor('model.layers.{i}.self_attn.q_proj.bias', ('attn', 'q', 'bias'), Flat()),  # [N*H] -> [N,H]
        Tensor('model.layers.{i}.self_attn.k_proj.bias', ('attn', 'k', 'bias'), Flat()),  # [K*H] -> [K,H]
        Tensor('model.layers.{i}.self_attn.v_proj.bias', ('attn', 'v', 'bias'), Flat()),  # [K*H] -> [K,H]
    ),
)


ATTENTION_TENSORS = tuple(t for t in LLAMA_TENSORS.layer if t.ours[0] != 'mlp')  # norms and attention


def moe_tensors(block: str, experts: dict[str, str], extra: tuple[Tensor, ...] = ()) -> TensorMap:
  """A mixture of experts' map: LLaMA's attention and norms, the router `{block}.gate` [E,D] -> mlp/router [D,E],
  per expert `{block}.experts.{j}.<name>` [F,D] or [D,F] -> one [D,F] / [F,D] slice of mlp/<ours> [E,...] for
  experts = {ours: HF name}, and the family's `extra` tensors (a shared expert, q/k norms)."""
  prefix = 'model.layers.{i}.' + block
  return dataclasses.replace(
      LLAMA_TENSORS,
      layer=ATTENTION_TENSORS + (Tensor(prefix + '.gate.weight', ('mlp', 'router', 'kernel'), Linear()),) + extra,
      experts=tuple(Tensor(prefix + '.experts.{j}.' + hf + '.weight', ('mlp', ours), Linear())
                    for ours, hf in experts.items()))


def moe_expressed(shared: bool, qk_norm: bool, norm_topk: bool | None = None) -> Callable[[Any], bool]:
  """expresses_ffn of a mixture-of-experts family: ffn=moe with (or without) a shared expert and q/k norms, and
  when the family cannot state it, the one router normalisation it uses."""
  def expresses(model) -> bool:
    return (model.get('ffn', 'dense') == 'moe' and bool(model.get('shared_expert_ffn_dim', 0)) == shared
            and bool(model.get('qk_norm', False)) == qk_norm
            and (norm_topk is None or bool(model.get('router_norm_topk', True)) == norm_topk))
  return expresses


@dataclasses.dataclass(frozen=True)
class Slot:
  """One HF tensor and where it lives in our params: `path`, for scanned layers the index on axis 0, and for a
  per-expert tensor the expert's index on the next axis."""
  hf: str
  path: tuple[str, ...]
  layer: int | None
  transform: Same | Linear | Flat
  expert: int | None = None

  def _index(self) -> tuple[int, ...]:
    return tuple(i for i in (self.layer, self.expert) if i is not None)

  def view(self, params) -> Any:
    leaf = _get(params, self.path)
    index = self._index()
    return leaf[index] if index else leaf

  def shape(self, abstract) -> tuple[int, ...]:
    return tuple(_get(abstract, self.path).shape)[len(self._index()):]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def plan(tensors: TensorMap, model_config) -> list[Slot]:
  """Every tensor of a model with this config.model, in HF checkpoint order."""
  slots = [Slot(t.hf, t.ours, None, t.transform) for t in tensors.model
           if not (model_config.tie_embeddings and t.ours[0] == 'lm_head')]
  layer_tensors = tensors.layer + (tensors.qkv_bias if model_config.qkv_bias else ())
  for i in range(model_config.num_layers):
    prefix, layer = layer_location(model_config, i)
    for t in layer_tensors:
      slots.append(Slot(t.hf.format(i=i), prefix + t.ours, layer, t.transform))
    for j in range(model_config.num_experts if tensors.experts else 0):
      for t in tensors.experts:
        slots.append(Slot(t.hf.format(i=i, j=j), prefix + t.ours, layer, t.transform, expert=j))
  return slots


def check_plan_covers(abstract, slots: list[Slot]) -> None:
  """Every parameter of the model is some HF tensor: a parameter added to the model must be added here too."""
  covered = {s.path for s in slots}
  for key_path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    path = tuple(k.key for k in key_path)
    if path not in covered:
      raise ConversionError(f'parameter {"/".join(path)} has no Hugging Face counterpart')


# --------------------------------------------------------------------------------------------------- RoPE

# HF rope_type -> config.model.rope_scaling
ROPE_TYPES = {'default': 'none', 'linear': 'linear', 'llama3': 'llama3', 'yarn': 'yarn'}
ROPE_FIELDS = {'factor': 'rope_scaling_factor', 'low_freq_factor': 'rope_low_freq_factor',  # HF key -> ours
               'high_freq_factor': 'rope_high_freq_factor', 'original_max_position_embeddings': 'rope_original_max_len',
               'beta_fast': 'rope_yarn_beta_fast', 'beta_slow': 'rope_yarn_beta_slow',
               'attention_factor': 'rope_attention_factor'}
# The HF keys each scaling reads (and is exported with); yarn's attention_factor is written as the value used.
ROPE_KEYS = {'linear': ('factor',),
             'llama3': ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'),
             'yarn': ('factor', 'original_max_position_embeddings', 'beta_fast', 'beta_slow', 'attention_factor')}
ROPE_REQUIRED = {'linear': ('factor',), 'llama3': ROPE_KEYS['llama3'],
                 'yarn': ('factor', 'original_max_position_embeddings')}


def rope_of(hf: dict) -> tuple[dict, str]:
  """(the RoPE parameters, the config field they came from) from either form: transformers>=5 `rope_parameters`,
  or the older top-level `rope_theta` + `rope_scaling`. The dict has rope_type ('default' when unscaled),
  rope_theta and the scaling's own keys. A yarn attention factor given as DeepSeek's mscale / mscale_all_dim
  becomes its value (transformers' formula: their ratio of 0.1 * m * ln(factor) + 1)."""
  params = dict(hf.get('rope_scaling') or {})
  field = 'rope_scaling' if params else 'rope_parameters'
  if hf.get('rope_parameters'):
    params.update(hf['rope_parameters'])
    field = 'rope_parameters'
  params['rope_type'] = params.get('rope_type') or params.get('type') or 'default'
  params['rope_theta'] = float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))
  if params['rope_type'] == 'yarn':
    for key in ('beta_fast', 'beta_slow', 'attention_factor'):  # transformers: None or 0 = the default
      if not params.get(key):
        params.pop(key, None)
    factor = params.get('factor')
    if 'attention_factor' not in params and params.get('mscale') and params.get('mscale_all_dim') and factor:
      mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
      params['attention_factor'] = mscale(params['mscale']) / mscale(params['mscale_all_dim'])
  return params, field


def hf_rope(model) -> dict:
  """The rope_parameters of our config.model."""
  params = dict(rope_type=next(k for k, v in ROPE_TYPES.items() if v == model.rope_scaling),
                rope_theta=model.rope_theta)
  for key in ROPE_KEYS.get(model.rope_scaling, ()):
    params[key] = model[ROPE_FIELDS[key]]
  if model.rope_scaling == 'yarn':  # the factor actually used, so transformers computes the same function
    params['attention_factor'] = float(model.rope_attention_factor or (
        1.0 if model.rope_scaling_factor <= 1 else 0.1 * math.log(model.rope_scaling_factor) + 1.0))
  return params


def check_rope(hf: dict, refuse: Callable) -> None:
  rope, rope_field = rope_of(hf)
  if rope['rope_type'] not in ROPE_TYPES:
    refuse(rope_field, f'rope scaling of type {rope["rope_type"]!r} is not supported (implemented: '
           f'{", ".join(ROPE_TYPES)})')
  if rope.get('partial_rotary_factor', 1.0) != 1.0:
    refuse(f'{rope_field}.partial_rotary_factor', f'{rope["partial_rotary_factor"]} is not supported (expected 1.0)')
  if rope['rope_type'] == 'yarn' and rope.get('truncate', True) is False:
    refuse(f'{rope_field}.truncate', 'yarn without truncation is not supported (expected true)')
  for key in ROPE_REQUIRED.get(rope['rope_type'], ()):
    if key not in rope:
      refuse(f'{rope_field}.{key}', f'missing for rope scaling {rope["rope_type"]!r}')


# --------------------------------------------------------------------------------------------------- family


def no_window(hf: dict, refuse: Callable) -> int:
  """A family without a sliding window: 0."""
  return 0


def as_saved(hf: dict, refuse: Callable | None) -> dict:
  """A family whose config.json has the LLaMA-shaped fields the checks read, as it is."""
  return hf


def no_fields(model, window: int | None) -> dict:
  return {}


def no_import_fields(hf: dict) -> dict:
  return {}


def repeating_pattern(kinds: list[str]) -> str:
  """config.model.attention_pattern of per-layer kinds ('global', 'sliding:W', ...): the shortest list whose
  repetition gives them (['global', 'sliding:8', 'global', 'sliding:8'] -> 'global,sliding:8')."""
  period = next(p for p in range(1, len(kinds) + 1) if all(k == kinds[i % p] for i, k in enumerate(kinds)))
  return ','.join(kinds[:period])


def layer_windows(model) -> list[int]:
  """Each layer's sliding window (0 = global) of a config.model: its kind's, or the one sliding_window."""
  pattern = parse_pattern(model.get('attention_pattern', 'global'))
  return [kind_of_layer(pattern, i).window or model.sliding_window for i in range(model.num_layers)]


def plain_pattern(model) -> bool:
  """A family that states no per-layer attention: every layer the same kind, the model's RoPE."""
  return parse_pattern(model.get('attention_pattern', 'global')) == (LayerKind(),)


def layer_types_pattern(model) -> bool:
  """A family that states each layer as full_attention or sliding_attention (Qwen2's layer_types): one window
  over the sliding layers, the model's RoPE on all."""
  pattern = parse_pattern(model.get('attention_pattern', 'global'))
  return not any(kind.rope_theta for kind in pattern) and len({w for w in layer_windows(model) if w}) <= 1


# config.model fields of a model's building blocks, at their LLaMA values: a family computes these unless its
# `style` says otherwise (Gemma's norms, GeGLU, embedding scale; None there: any value, the family states it).
LLAMA_STYLE = dict(norm='rms', post_norms=False, mlp_activation='silu', embed_scale=False, query_pre_attn_scalar=0.0,
                   attn_logit_softcap=0.0, final_logit_softcap=0.0)


def dense_only(model) -> bool:
  """A LLaMA-like family: the dense SwiGLU and no q/k norm over all heads (qk_norm_per_head: Family's own field)."""
  return model.get('ffn', 'dense') == 'dense' and not model.get('qk_norm', False)


@dataclasses.dataclass(frozen=True)
class Family:
  """A Hugging Face architecture llm_jax computes exactly, and what it can express.

  window(hf, refuse) -> the sliding window of every layer of a (checked) HF config, 0 for none (per-layer windows:
  refused, or 0 and given by import_fields as attention_pattern).
  export_fields(model, window) -> the family's own config.json fields (its window form, its flags).
  """
  model_type: str
  architecture: str
  qkv_bias: bool  # its q/k/v projections always have biases (and o, gate, up, down never)
  has_window: bool  # it can state a sliding window
  tensors: TensorMap = LLAMA_TENSORS
  must_be: tuple[tuple[str, Any], ...] = ()  # HF fields that must hold these values (if present), else refused
  window: Callable[[dict, Callable], int] = no_window
  export_fields: Callable[[Any, int | None], dict] = no_fields
  import_fields: Callable[[dict], dict] = no_import_fields  # its own config.model fields (the experts)
  expresses_ffn: Callable[[Any], bool] = dense_only  # whether its FFN and attention extras are the model's
  qk_norm_per_head: bool = False  # its q and k heads are always RMS-normalised over head_dim (Qwen3)
  expresses_pattern: Callable[[Any], bool] = plain_pattern  # whether it states the model's attention_pattern
  style: tuple[tuple[str, Any], ...] = ()  # its values of LLAMA_STYLE's fields where they differ (None: any)
  activation: tuple[str, str] = ('hidden_act', 'silu')  # the HF field naming its MLP activation, and its value
  # its config.json in the LLaMA shape the checks and model_fields read (Gemma 3: one RoPE of several flattened)
  hf_view: Callable[[dict, Callable | None], dict] = as_saved
  skipped: tuple[str, ...] = ()  # tensor-name prefixes of parts its checkpoints hold that llm_jax does not import
  exports: bool = True  # False: import only (a multimodal wrapper: its language model exports as the text family)

  def expresses(self, model) -> bool:
    style = {**LLAMA_STYLE, **dict(self.style)}
    return (self.exports and self.qkv_bias == bool(model.qkv_bias) and (self.has_window or not model.sliding_window)
            and self.qk_norm_per_head == bool(model.get('qk_norm_per_head', False)) and self.expresses_ffn(model)
            and self.expresses_pattern(model)
            and all(value is None or model.get(field, LLAMA_STYLE[field]) == value for field, value in style.items()))

  def model_fields(self, hf: dict) -> dict[str, Any]:
    """config.model fields of the model a (checked) HF config of this family describes."""
    hf = self.hf_view(hf, None)
    rope, _ = rope_of(hf)
    fields = dict(
        vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
        num_heads=hf['num_attention_heads'],
        num_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
        ffn_dim=hf['intermediate_size'], max_seq_len=hf.get('max_position_embeddings', 2048),
        rope_theta=rope['rope_theta'], rope_scaling=ROPE_TYPES[rope['rope_type']],
        norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        init_std=float(hf.get('initializer_range', 0.02)),
        qkv_bias=self.qkv_bias, qk_norm_per_head=self.qk_norm_per_head,
        sliding_window=self.window(hf, None),
    )
    if hf.get('head_dim') and hf['head_dim'] * hf['num_attention_heads'] != hf['hidden_size']:
      fields['head_dim'] = hf['head_dim']  # else 0: the width follows d_model, as in configs made before the field
    for key, ours in ROPE_FIELDS.items():
      if key in rope and fields['rope_scaling'] != 'none':
        fields[ours] = type(config_lib.get_config().model[ours])(rope[key])
    fields.update({field: value for field, value in self.style if value is not None})
    fields.update(self.import_fields(hf))
    return fields

  def hf_config(self, model, dtype: str, token_ids: dict[str, int | None]) -> dict:
    """config.json of this family's ForCausalLM equal to our model (both rope forms, for old and new
    transformers)."""
    rope = hf_rope(model)
    hf = dict(
        architectures=[self.architecture], model_type=self.model_type, vocab_size=model.vocab_size,
        hidden_size=model.d_model, intermediate_size=model.ffn_dim, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads, num_key_value_heads=model.num_kv_heads,
        head_dim=head_dim_of(model), hidden_act='silu', max_position_embeddings=model.max_seq_len,
        rms_norm_eps=model.norm_eps, rope_theta=model.rope_theta,
        rope_scaling=({k: v for k, v in rope.items() if k != 'rope_theta'} if model.rope_scaling != 'none' else None),
        rope_parameters=rope, attention_dropout=0.0, tie_word_embeddings=model.tie_embeddings,
        initializer_range=model.init_std, use_cache=True, torch_dtype=dtype, dtype=dtype, **token_ids)
    hf.update(self.export_fields(model, model.sliding_window or None))
    return hf
