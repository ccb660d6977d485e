"""Hugging Face interop for LLaMA-family checkpoints: import into a workdir, export from one.

Architectures: the families of `llm_jax.families` (one module each, with its tensor-name map and config
translation): LlamaForCausalLM (LLaMA 2, 3, 3.1, 3.2: rope scaling `llama3` or `linear`, tied or untied
embeddings), Qwen2ForCausalLM (Qwen2, Qwen2.5: q/k/v biases, sliding window when every layer has it) and
MistralForCausalLM (sliding window). A config maps to config.model fields (`Family.model_fields`: rope_scaling
and its factors, qkv_bias, sliding_window); export picks the architecture the workdir was imported from when it
can express the model, else the first that can (`families.export_family`). This module is the CLI and the
safetensors I/O over them.

  python -m llm_jax.convert from_hf --hf_dir D --workdir W [--noscan_layers] [--dtype float32]
  python -m llm_jax.convert to_hf --workdir W --hf_dir D [--hf_dtype bfloat16]

Import reads `config.json` and the safetensors weights (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) and writes a workdir that training (`config.train.init_from=W`), generation and
evaluation use: `config.json` (the base config with the model fields taken from the HF config), the parameters as
the checkpoint of step 0, and the tokenizer beside the HF files with its fingerprint: `tokenizer.json` (with
`tokenizer_config.json` and `chat_template.jinja` when present: special tokens and chat template) when there is
one, as transformers' AutoTokenizer prefers it, else the SentencePiece `tokenizer.model`.
The data source stays `synthetic` (a checkpoint carries no data: pick a source before training); when a tokenizer
is imported, `data.tokenizer_path` points at the workdir's copy, so text sources tokenise with the model's own
tokenizer instead of training a new one. Whether the model's inputs start with BOS follows the imported tokenizer
as transformers' does by default: a tokenizer.json's post-processor says it (Llama 3.x, Llama 2, Mistral: BOS;
llm_jax.data.tokenizer reads it from the workdir's copy), and a tokenizer.model alone is given data.add_bos=always
when tokenizer_config.json has add_bos_token true. Export writes `config.json` and safetensors that
`transformers.AutoModelForCausalLM.from_pretrained` loads, plus the workdir's tokenizer files; a tokenizer.json
without a tokenizer_config.json (one preparation trained) gets one (PreTrainedTokenizerFast, its special tokens),
so `AutoTokenizer.from_pretrained` loads the export too. A LoRA
workdir (config.lora.rank > 0) exports its adapters merged into the base weights (`lora.merge`: W + A@B *
alpha/rank), so the export is a plain LLaMA model computing the fine-tuned function.

Weights map one tensor at a time through the family's `TensorMap` (HF name -> our parameter path + transform). A torch
`nn.Linear` stores [out, in]; our kernels are [in..., out...] with heads split out, e.g. q_proj [N*H, D] <->
attn/q/kernel [D, N, H] and o_proj [D, N*H] <-> attn/o/kernel [N, H, D]. With scanned layers every per-layer
leaf has a leading [L] axis, filled (or read) one layer at a time.

Rotary layout: our RoPE (`model.layers.apply_rope`) is the rotate-half form of HF's LlamaModel, pairing
feature i with i + H/2. The permutation of q/k rows in HF's `convert_llama_weights_to_hf.py` converts Meta's
interleaved layout (pairs (2i, 2i+1)) into that rotate-half form; HF checkpoints are already in it, so q/k
load here unpermuted (tests/test_convert.py checks logits against transformers to 1e-4 in float32).

Memory: the parameters exist once on the host (preallocated in `param_dtype`); each HF tensor is read (memory-
mapped by safetensors), transformed and written into its slot, so at most one extra tensor is alive. Export
streams the safetensors file tensor by tensor for the same reason.

The safetensors library reads every tensor whose dtype numpy has; numpy has no bfloat16 (the dtype of most
LLaMA releases), so bfloat16 tensors are memory-mapped from the byte range the file header names, as
`ml_dtypes.bfloat16`. torch is never imported.

Options outside what llm_jax implements (another architecture, rope scaling yarn/dynamic/longrope, partial rotary
dimensions, biases other than Qwen2's q/k/v, a window on some layers only, another activation, a decoupled
head_dim, quantised weights) are refused with a message naming the field.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import sys
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from llm_jax import checkpoint
from llm_jax import storage
from llm_jax import config as config_lib
from llm_jax import validation
from llm_jax.families import FAMILIES, ConversionError, Slot, check_plan_covers, check_supported, export_family, \
    model_fields_from_hf, plan
from llm_jax.model import lora
from llm_jax import cli
from llm_jax import objectives
from llm_jax import runtime
from llm_jax.data import tokenizer as tokenizer_lib

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
TOKENIZER_FILE = 'tokenizer.model'
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # export shards above this size (the HF default, 5GB)

# safetensors dtype code <-> numpy dtype (bfloat16 through ml_dtypes).
DTYPES = {'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'), 'BF16': np.dtype(ml_dtypes.bfloat16)}
DTYPE_CODES = {'float32': 'F32', 'float16': 'F16', 'bfloat16': 'BF16'}

# Tensors HF checkpoints may carry that hold no weights (older LLaMA files saved the RoPE frequencies).
IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isdir(hf_dir):
    raise ConversionError(f'{hf_dir}: no such directory')
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: missing; a Hugging Face checkpoint directory has config.json beside its '
                          'safetensors')
  with open(path) as f:
    hf = json.load(f)
  check_supported(hf, path)
  return hf


def hf_config_from_model(model, dtype: str, token_ids: dict[str, int | None], preferred: str | None = None) -> dict:
  """config.json of the HF model (llm_jax.families.export_family) equal to our config.model."""
  return export_family(model, preferred).hf_config(model, dtype, token_ids)


# ------------------------------------------------------------------------------------------ safetensors I/O


class HFWeights:
  """The tensors of a HF checkpoint directory (single file or sharded), read one at a time."""

  def __init__(self, hf_dir: str):
    index_path = os.path.join(hf_dir, INDEX_FILE)
    single_path = os.path.join(hf_dir, SINGLE_FILE)
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, Any] = {}
    self._headers: dict[str, tuple[dict, int]] = {}
    if os.path.isfile(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get('weight_map')
      if not weight_map:
        raise ConversionError(f'{index_path}: no "weight_map"')
      for file in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(hf_dir, file)):
          raise ConversionError(f'{os.path.join(hf_dir, file)}: missing (listed in {index_path})')
      self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    elif os.path.isfile(single_path):
      self.files = {name: single_path for name in self._handle(single_path).keys()}
    else:
      found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, '*.safetensors')))
      raise ConversionError(f'{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found'
                            + (f' (found {found})' if found else '')
                            + '; only safetensors checkpoints are read (not pytorch_model.bin)')

  def close(self) -> None:
    self._stack.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _handle(self, path: str):
    if path not in self._handles:
      self._handles[path] = self._stack.enter_context(safe_open(path, framework='numpy'))
    return self._handles[path]

  def names(self) -> list[str]:
    return list(self.files)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    path = self.files[name]
    code = self._handle(path).get_slice(name).get_dtype()
    if code not in DTYPES:
      raise ConversionError(f'{path}: tensor {name} has dtype {code}; expected one of {", ".join(DTYPES)}')
    if code != 'BF16':
      return self._handle(path).get_tensor(name)
    header, data_start = self._header(path)
    begin, _ = header[name]['data_offsets']
    return np.memmap(path, dtype=DTYPES[code], mode='r', offset=data_start + begin,
                     shape=tuple(header[name]['shape']))

  def _header(self, path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts (for dtypes numpy lacks)."""
    if path not in self._headers:
      with open(path, 'rb') as f:
        size = int.from_bytes(f.read(8), 'little')
        self._headers[path] = (json.loads(f.read(size)), 8 + size)
    return self._headers[path]


def write_safetensors(path: str, specs: list[tuple[str, tuple[int, ...], str]],
                      produce: Callable[[str], np.ndarray]) -> None:
  """Streams a safetensors file: the header from `specs` (name, shape, dtype code), then each tensor's bytes
  as `produce(name)` makes it, so only one tensor is in memory. Written to a temporary name, then renamed."""
  header, offset = {}, 0
  for name, shape, code in specs:
    size = math.prod(shape) * DTYPES[code].itemsize
    header[name] = dict(dtype=code, shape=list(shape), data_offsets=[offset, offset + size])
    offset += size
  header['__metadata__'] = {'format': 'pt'}
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # the data starts 8-byte aligned
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(len(blob).to_bytes(8, 'little'))
    f.write(blob)
    for name, shape, code in specs:
      array = np.ascontiguousarray(produce(name), dtype=DTYPES[code])
      assert array.shape == tuple(shape), (name, array.shape, shape)
      f.write(array.reshape(-1).view(np.uint8).data)  # bytes, zero-copy (bfloat16 has no buffer format)
  os.replace(tmp, path)


def _shards(specs, max_shard_bytes: int) -> list[list]:
  """Consecutive groups of tensors, each at most max_shard_bytes (a bigger tensor gets a shard of its own)."""
  shards, size = [[]], 0
  for spec in specs:
    nbytes = math.prod(spec[1]) * DTYPES[spec[2]].itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  return shards


# -------------------------------------------------------------------------------------------------- workdirs


def _abstract_params(config):
  return runtime.abstract_params(config)


def _install_tokenizer(source: str, workdir: str):
  """Copies a tokenizer (all its files) into the workdir with its fingerprint; returns it."""
  return tokenizer_lib.bind_to_workdir(source, workdir)


def _hf_tokenizer_file(hf_dir: str) -> str | None:
  """The tokenizer of a HF checkpoint directory: tokenizer.json first (what AutoTokenizer uses), else
  tokenizer.model."""
  for name in ('tokenizer.json', TOKENIZER_FILE):
    if os.path.isfile(os.path.join(hf_dir, name)):
      return os.path.join(hf_dir, name)
  return None


def _hf_adds_bos(hf_dir: str) -> bool:
  """tokenizer_config.json's add_bos_token (a tokenizer.model without a tokenizer.json: Llama 2 / Mistral)."""
  path = os.path.join(hf_dir, tokenizer_lib.HF_CONFIG_FILE)
  if not os.path.isfile(path):
    return False
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f).get('add_bos_token') is True
  except (OSError, ValueError, AttributeError):
    return False


def write_workdir(config, params, workdir: str, meta: dict) -> None:
  """config.json and `params` as the checkpoint of step 0: a workdir like one training makes."""
  storage.makedirs(workdir)
  storage.write_json(storage.join(workdir, 'config.json'), json.loads(config.to_json_best_effort()))
  manager = checkpoint.make_manager(workdir, keep=1, async_save=False)
  try:
    checkpoint.save(manager, 0, params, meta=meta, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()


def from_hf(hf_dir: str, workdir: str, *, scan_layers: bool = True, dtype: str = 'bfloat16',
            param_dtype: str = 'float32') -> Any:
  """Imports a HF LLaMA checkpoint into a new workdir; returns the workdir's config."""
  if storage.is_url(hf_dir):  # safetensors memory-maps local files: a bucket folder is read through a download
    with storage.local_dir(hf_dir) as local:
      return from_hf(local, workdir, scan_layers=scan_layers, dtype=dtype, param_dtype=param_dtype)
  hf = read_hf_config(hf_dir)
  if checkpoint.latest_step(workdir) is not None:
    raise ConversionError(f'{workdir}: already has checkpoints; import into a new workdir')
  config = config_lib.get_config()
  config.model.update(model_fields_from_hf(hf))
  config.model.update(scan_layers=scan_layers, dtype=dtype, param_dtype=param_dtype)
  config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
  try:
    validation.validate(config, 1)
  except config_lib.ConfigError as e:
    raise ConversionError(f'{hf_dir}/config.json describes a model llm_jax cannot build: {e}') from e

  family = FAMILIES[hf['model_type']]
  abstract = _abstract_params(config)
  slots = plan(family.tensors, config.model)
  check_plan_covers(abstract, slots)
  with HFWeights(hf_dir) as weights:
    _check_tensors(weights, slots, abstract, hf_dir, family.architecture, family.skipped)
    params = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), abstract)  # the only full copy
    for slot in slots:
      target = slot.view(params)
      target[...] = slot.transform.to_ours(weights.read(slot.hf), target.shape)

  storage.makedirs(workdir)
  fingerprint = None
  tokenizer_path = _hf_tokenizer_file(hf_dir)
  if tokenizer_path:
    tokenizer = _install_tokenizer(tokenizer_path, workdir)
    fingerprint = tokenizer.fingerprint
    config.data.tokenizer_path = storage.join(storage.absolute(workdir), tokenizer.file_name)
    if tokenizer.kind == 'sentencepiece' and _hf_adds_bos(hf_dir):
      config.data.add_bos = 'always'  # a SentencePiece model file carries no such setting: the config records it
  meta = dict(model=config.model.to_dict(), tokenizer_fingerprint=fingerprint,
              converted_from=os.path.abspath(hf_dir), hf_config=hf)
  write_workdir(config, params, workdir, meta)
  return config


def _check_tensors(weights: HFWeights, slots: list[Slot], abstract, hf_dir: str, hf_architecture: str,
                   skipped: tuple[str, ...] = ()) -> None:
  """Before allocating anything: every tensor present with its shape, and nothing we would silently drop."""
  names = set(weights.names())
  missing = [s.hf for s in slots if s.hf not in names]
  if missing:
    raise ConversionError(f'{hf_dir}: tensor {missing[0]} is missing from the checkpoint'
                          + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''))
  for slot in slots:
    expected, found = slot.transform.hf_shape(slot.shape(abstract)), weights.shape(slot.hf)
    if expected != found:
      raise ConversionError(f'{weights.files[slot.hf]}: tensor {slot.hf} has shape {list(found)}, expected '
                            f'{list(expected)} from config.json')
  known = {s.hf for s in slots}
  if not any(s.path[0] == 'lm_head' for s in slots):
    known.add('lm_head.weight')  # tied: HF ties lm_head to the embedding too, ignoring a saved copy
  left_out = {n for n in names - known if skipped and n.startswith(skipped)}
  if left_out:  # said once, here: the family's parts llm_jax has no model for (Gemma 3's vision tower)
    print(f'note: {hf_dir}: {len(left_out)} tensors under {", ".join(skipped)} are skipped: llm_jax imports the '
          f'language model of {hf_architecture}, not its vision tower', file=sys.stderr, flush=True)
  unexpected = sorted(n for n in names - known if not n.endswith(IGNORED_SUFFIXES) and n not in left_out)
  if unexpected:
    raise ConversionError(f'{hf_dir}: tensor {unexpected[0]} is not part of a {hf_architecture} model with this '
                          'config.json'
                          + (f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else '')
                          + '; refusing to drop weights')


def _workdir_tokenizer(workdir: str, add_bos: str = 'tokenizer'):
  return tokenizer_lib.load_from_workdir(workdir, add_bos) if tokenizer_lib.workdir_tokenizer(workdir) else None


def _check_exportable(config) -> None:
  if not objectives.REGISTRY[config.model.objective].causal:
    raise ConversionError(f'config.model.objective={config.model.objective!r}: only causal LMs (clm, dpo) export '
                          f'as {", ".join(f.architecture for f in FAMILIES.values())}')
  export_family(config.model)


def _token_ids(tokenizer, meta: dict) -> dict[str, Any]:
  """bos/eos/pad ids: those of the imported HF config where it has them (Llama 3.1 lists several EOS ids), else
  the workdir's tokenizer's, else none."""
  ids = dict.fromkeys(('bos_token_id', 'eos_token_id', 'pad_token_id'))
  if tokenizer is not None:
    ids.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    ids = {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}
  hf = meta.get('hf_config') or {}
  ids.update({k: hf[k] for k in ids if hf.get(k) is not None})
  return ids


def _export_tokenizer(tokenizer, hf_dir: str, max_len: int) -> list[str]:
  """The tokenizer's files in the export, and a tokenizer_config.json for a tokenizer.json that has none."""
  written = tokenizer_lib.copy_files(tokenizer, hf_dir)
  if tokenizer.kind == 'hf' and tokenizer_lib.HF_CONFIG_FILE not in written:
    names = dict(bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                 pad_token=tokenizer.decode_token(tokenizer.pad_id), unk_token=tokenizer.decode_token(tokenizer.unk_id))
    hf_config = dict(tokenizer_class='PreTrainedTokenizerFast', model_max_length=max_len,
                     clean_up_tokenization_spaces=False, **{k: v for k, v in names.items() if v is not None})
    if tokenizer.chat_template:
      hf_config['chat_template'] = tokenizer.chat_template
    storage.write_json(os.path.join(hf_dir, tokenizer_lib.HF_CONFIG_FILE), hf_config)
    written.append(tokenizer_lib.HF_CONFIG_FILE)
  if tokenizer.kind == 'sentencepiece' and tokenizer.add_bos:  # data.add_bos=always: transformers adds it too
    hf_config = dict(tokenizer_class='LlamaTokenizer', add_bos_token=True, add_eos_token=False,
                     bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, model_max_length=max_len)
    storage.write_json(os.path.join(hf_dir, tokenizer_lib.HF_CONFIG_FILE), hf_config)
    written.append(tokenizer_lib.HF_CONFIG_FILE)
  return written


def to_hf(workdir: str, hf_dir: str, *, hf_dtype: str | None = None,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Exports the workdir's newest intact checkpoint as a HF LLaMA checkpoint; returns the files written."""
  config = config_lib.load_workdir_config(workdir)
  _check_exportable(config)
  hf_dtype = hf_dtype or config.model.param_dtype
  if hf_dtype not in DTYPE_CODES:
    raise ConversionError(f'hf_dtype: {hf_dtype!r} is not one of {", ".join(DTYPE_CODES)}')
  if storage.exists(storage.join(hf_dir, 'config.json')) or storage.glob(storage.join(hf_dir, '*.safetensors')):
    raise ConversionError(f'{hf_dir}: already holds a checkpoint; export into a new directory')
  if storage.is_url(hf_dir):  # safetensors are written to local files: export there, then upload the folder
    with storage.staged_dir(hf_dir) as local:
      return to_hf(workdir, local, hf_dtype=hf_dtype, max_shard_bytes=max_shard_bytes)
  abstract = _abstract_params(config)  # with lora_a/lora_b leaves when config.lora.rank > 0
  base_abstract = lora.split(abstract)[0] if config.lora.rank else abstract
  params, meta = checkpoint.load_params(workdir, abstract)
  imported_as = (meta.get('hf_config') or {}).get('model_type')
  family = export_family(config.model, imported_as)
  slots = plan(family.tensors, config.model)
  check_plan_covers(base_abstract, slots)
  if config.lora.rank:  # W + A@B * alpha/rank: the same function as base + adapters, as plain LLaMA weights
    params = lora.merge(params, config.lora.alpha, config.lora.rank)
  abstract = base_abstract
  by_name = {s.hf: s for s in slots}
  code = DTYPE_CODES[hf_dtype]
  specs = [(s.hf, s.transform.hf_shape(s.shape(abstract)), code) for s in slots]

  def produce(name: str) -> np.ndarray:
    slot = by_name[name]
    return slot.transform.to_hf(np.asarray(slot.view(params)))

  os.makedirs(hf_dir, exist_ok=True)
  shards = _shards(specs, max_shard_bytes)
  written = []
  if len(shards) == 1:
    write_safetensors(os.path.join(hf_dir, SINGLE_FILE), specs, produce)
    written.append(SINGLE_FILE)
  else:
    weight_map = {}
    for k, shard in enumerate(shards):
      file = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
      write_safetensors(os.path.join(hf_dir, file), shard, produce)
      weight_map.update({spec[0]: file for spec in shard})
      written.append(file)
    total = sum(math.prod(shape) * DTYPES[c].itemsize for _, shape, c in specs)
    storage.write_json(os.path.join(hf_dir, INDEX_FILE),
                                 dict(metadata=dict(total_size=total), weight_map=weight_map))
    written.append(INDEX_FILE)
  tokenizer = _workdir_tokenizer(workdir, config.data.add_bos)
  hf_config = family.hf_config(config.model, hf_dtype, _token_ids(tokenizer, meta))
  storage.write_json(os.path.join(hf_dir, 'config.json'), hf_config)
  written.append('config.json')
  if tokenizer is not None:
    written += _export_tokenizer(tokenizer, hf_dir, config.model.max_seq_len)
  return written


# ------------------------------------------------------------------------------------------------- entry point


def _main():
  """The command line. Flags are defined here, not at import, so that tests can import every job together."""
  from absl import app, flags


  hf_dir = flags.DEFINE_string('hf_dir', None, 'Hugging Face checkpoint directory (config.json + safetensors).')
  workdir = flags.DEFINE_string('workdir', None, 'llm_jax workdir (from_hf: created; to_hf: read).')
  scan_layers = flags.DEFINE_bool('scan_layers', True, 'from_hf: store the layers stacked for nn.scan.')
  dtype = flags.DEFINE_enum('dtype', 'bfloat16', list(DTYPE_CODES), 'from_hf: config.model.dtype (compute).')
  param_dtype = flags.DEFINE_enum('param_dtype', 'float32', list(DTYPE_CODES),
                                  'from_hf: config.model.param_dtype (stored weights).')
  hf_dtype = flags.DEFINE_enum('hf_dtype', None, list(DTYPE_CODES), 'to_hf: dtype of the exported weights '
                               '(default: the workdir\'s param_dtype).')
  max_shard_gb = flags.DEFINE_float('max_shard_gb', DEFAULT_MAX_SHARD_BYTES / 1e9,
                                    'to_hf: safetensors files above this size are split into shards.')

  def main(argv):
    if len(argv) != 2 or argv[1] not in ('from_hf', 'to_hf'):
      raise app.UsageError('usage: python -m llm_jax.convert {from_hf|to_hf} --hf_dir D --workdir W')
    if not hf_dir.value or not workdir.value:
      raise app.UsageError('--hf_dir and --workdir are required')
    if argv[1] == 'from_hf':
      from_hf(hf_dir.value, workdir.value, scan_layers=scan_layers.value, dtype=dtype.value,
              param_dtype=param_dtype.value)
      print(f'imported {hf_dir.value} into {workdir.value} (checkpoint step 0)')
    else:
      files = to_hf(workdir.value, hf_dir.value, hf_dtype=hf_dtype.value,
                    max_shard_bytes=int(max_shard_gb.value * 1e9))
      print(f'exported {workdir.value} to {hf_dir.value}: {", ".join(files)}')

  cli.run(main)


if __name__ == '__main__':
  _main()
