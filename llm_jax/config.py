"""Base configuration, and the checks of the run's own fields.

Every field is declared here once, with a comment on the same line; presets in experiments/ start from
`get_config()` and change only what differs. `llm_jax.validation.validate()` rejects an inconsistent config before
anything compiles, with a message that names the field: each part checks its own fields, this module the run's
(`check_run`).

The inline comments are the configuration reference: docs/configuration.md is generated from them
(`python -m llm_jax.config_docs`), and a test fails when a field has no comment.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import ml_collections
from llm_jax import storage  # the path layer: it imports only the error types
from llm_jax.errors import ConfigError, UserError, check_choice, fail  # noqa: F401 (ConfigError: config.ConfigError for callers)

# The choices of most fields are declared where they are implemented, and each part checks its own fields
# (llm_jax.validation.validate calls them all; tests/test_house.py checks each field's comment lists its registry):
#   model.attention, dtype, rope_scaling, remat, ffn, moe_compute; lora.targets   llm_jax.model.check_config
#   model.objective, dpo.*, grpo.* (the loss; the rewards: llm_jax.rewards)      llm_jax.objectives.check_config
#   data.*                                                                      llm_jax.data.check_config
#   train.schedule, wsd_*, moments_dtype, learning_rate, warmup_steps           llm_jax.optim.check_config
# This module checks the run itself: the mesh and its rules, batch sizes, the loop's cadences (check_run).
NONFINITE_POLICIES = ('stop', 'skip')  # the training loop's (train.py) answers to a non-finite step
WANDB_MODES = ('online', 'offline', 'disabled')  # wandb.init's modes
INIT_FROM_ADAPTERS = ('merge', 'keep')  # what train.py's init_from does with the LoRA adapters of its source
MESH_AXES = ('data', 'expert', 'fsdp', 'context', 'tensor')  # the batch is split over data, expert and fsdp; the sequence over context

# config.model fields a checkpoint's parameters depend on (their shapes and tree), and fields that change what
# those weights compute: a checkpoint is only loaded into a config that agrees on both.
SHAPE_FIELDS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'ffn_dim', 'tie_embeddings',
                'scan_layers', 'qkv_bias', 'qk_norm', 'qk_norm_per_head', 'head_dim', 'ffn', 'num_experts',
                'expert_ffn_dim', 'shared_expert_ffn_dim', 'attention_pattern', 'post_norms')
FUNCTION_FIELDS = ('rope_theta', 'norm_eps', 'rope_scaling', 'rope_scaling_factor', 'rope_low_freq_factor',
                   'rope_high_freq_factor', 'rope_original_max_len', 'rope_yarn_beta_fast', 'rope_yarn_beta_slow',
                   'rope_attention_factor', 'sliding_window', 'experts_per_token', 'router_norm_topk', 'norm',
                   'mlp_activation', 'embed_scale', 'query_pre_attn_scalar', 'attn_logit_softcap',
                   'final_logit_softcap')

# Logical axis -> mesh axes. Parameters and activations have their own names, so their shardings are tuned
# apart. Turning FSDP into tensor parallelism is an edit of this table (or of config.mesh sizes).
DEFAULT_RULES = (
    # parameters
    ('vocab', 'tensor'),
    ('embed', ('fsdp', 'context')),  # weights and optimizer state stay sharded over context too (as MaxText's embed)
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('layers', None),
    ('norm', None),
    ('lora_rank', None),
    ('expert', 'expert'),  # experts of a mixture: expert parallelism
    ('expert_mlp', 'tensor'),
    ('expert_router', None),
    # activations
    ('act_batch', ('data', 'expert', 'fsdp')),
    ('act_seq', 'context'),  # context parallelism: the sequence split over it (llm_jax/model/context.py)
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


def get_config() -> ml_collections.ConfigDict:
  """The base config: a small LLaMA-style model on the synthetic source. Presets override fields."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 32000  # Vocabulary size; at least the tokenizer's size when a tokenizer is used (extra rows are padding).
  c.model.d_model = 512  # Width of the residual stream.
  c.model.num_layers = 8  # Number of transformer blocks.
  c.model.num_heads = 8  # Query heads; must divide d_model unless model.head_dim is set.
  c.model.head_dim = 0  # Width of each attention head (even, for RoPE); 0 = d_model // num_heads (Qwen3-0.6B, Gemma: wider heads than that).
  c.model.num_kv_heads = 8  # Key/value heads (grouped-query attention); must divide num_heads.
  c.model.ffn_dim = 1408  # Hidden width of the SwiGLU MLP.
  c.model.max_seq_len = 2048  # Longest sequence the model accepts (training, decoding); data.seq_len <= this (preference pairs: dpo.max_length, a row holding several sequences).
  c.model.rope_theta = 10000.0  # RoPE base frequency (LLaMA-2: 10000, LLaMA-3: 500000).
  c.model.rope_scaling = 'none'  # RoPE frequency scaling for longer contexts: none | linear | llama3 (Llama 3.1/3.2) | yarn (YaRN: Qwen, DeepSeek; llm_jax/model/layers.py Rope).
  c.model.rope_scaling_factor = 1.0  # linear / llama3 / yarn: factor the (low) frequencies are divided by (Llama 3.1: 8, 3.2: 32; YaRN: the context extension, e.g. 4).
  c.model.rope_low_freq_factor = 1.0  # llama3: wavelengths above rope_original_max_len / this are fully scaled.
  c.model.rope_high_freq_factor = 4.0  # llama3: wavelengths below rope_original_max_len / this are not scaled.
  c.model.rope_original_max_len = 8192  # llama3 / yarn: context length of the model before scaling.
  c.model.rope_yarn_beta_fast = 32.0  # yarn: dimensions turning more than this many times over rope_original_max_len keep their frequency (HF beta_fast).
  c.model.rope_yarn_beta_slow = 1.0  # yarn: dimensions turning fewer than this many times are fully divided by rope_scaling_factor; a linear ramp between (HF beta_slow).
  c.model.rope_attention_factor = 0.0  # yarn: cos and sin are multiplied by this (the logits by its square); 0 = 0.1 * ln(rope_scaling_factor) + 1, as the paper (HF attention_factor; imported from mscale / mscale_all_dim where given).
  c.model.qkv_bias = False  # Biases on the q, k and v projections (Qwen2/2.5); changes the parameter tree.
  c.model.qk_norm = False  # RMSNorm of the queries and keys over all heads, before RoPE (OLMoE); changes the parameter tree.
  c.model.qk_norm_per_head = False  # RMSNorm of each query and key head over head_dim (one scale [head_dim] shared by the heads), before RoPE (Qwen3, Gemma 3); not with qk_norm; changes the parameter tree.
  c.model.ffn = 'dense'  # Feed-forward layer of every block: dense (SwiGLU of ffn_dim) | moe (mixture of SwiGLU experts; llm_jax/model/moe.py).
  c.model.num_experts = 0  # ffn=moe: routed experts per layer (>= 2).
  c.model.experts_per_token = 2  # ffn=moe: experts each token is routed to (top-k of the float32 router's softmax).
  c.model.expert_ffn_dim = 0  # ffn=moe: hidden width of each expert; 0 = ffn_dim.
  c.model.shared_expert_ffn_dim = 0  # ffn=moe: hidden width of a shared expert every token uses, gated by sigmoid(x . w) (Qwen2-MoE); 0 = none.
  c.model.router_norm_topk = True  # ffn=moe: renormalise the k chosen routing weights to sum to 1 (Mixtral: always; Qwen2-MoE, OLMoE: their norm_topk_prob).
  c.model.router_aux_loss_coef = 0.01  # ffn=moe: coefficient of the load-balancing loss E * sum_i f_i P_i (Switch; HF's router_aux_loss_coef), logged as aux/moe_balance; 0 = off.
  c.model.router_z_loss_coef = 0.0  # ffn=moe: coefficient of the router z-loss, the mean of logsumexp(router logits)^2 (ST-MoE: 1e-3), logged as aux/router_z; 0 = off.
  c.model.moe_compute = 'ragged'  # ffn=moe: ragged (dropless: tokens sorted by expert, jax.lax.ragged_dot grouped matmuls; on a mesh always inside shard_map, each device routing its own tokens; under an expert mesh axis > 1 the tokens are all-gathered over it and each device runs its own experts) | dense (every expert on every token, one-hot combine: the reference).
  c.model.sliding_window = 0  # Sliding-window attention: each token sees itself and the previous sliding_window-1 tokens (Mistral); 0 = the whole context.
  c.model.attention_pattern = 'global'  # Attention of each layer, comma-separated kinds repeated over the layers (layer i: kind i mod their count): global | sliding (as sliding:WINDOW, a window of WINDOW tokens); either kind may end in @THETA, the layer's own RoPE base, unscaled (Gemma 2: 'sliding:4096,global'; Gemma 3: 'sliding:1024@10000' five times, then 'global'). With scan_layers one repeat of the pattern is scanned, the layers after the last whole repeat unrolled; changes the parameter tree then.
  c.model.norm_eps = 1e-5  # Epsilon of RMSNorm.
  c.model.norm = 'rms'  # RMSNorm's scale, in every norm of the model: rms (x / rms(x) * w) | rms_plus_one (times 1 + w, w starting at 0: Gemma).
  c.model.post_norms = False  # Sandwich norms: an RMSNorm also after the attention and after the MLP, before each is added to the residual (Gemma 2/3); changes the parameter tree.
  c.model.mlp_activation = 'silu'  # Activation of the gated MLP, act(gate(x)) * up(x): silu (SwiGLU) | gelu_tanh (GeGLU with GELU's tanh approximation: Gemma).
  c.model.embed_scale = False  # Multiply the token embeddings by sqrt(d_model), in the compute dtype (Gemma); the output projection (tied or not) is unscaled.
  c.model.query_pre_attn_scalar = 0.0  # Attention logits are q.k / sqrt(this) (Gemma: query_pre_attn_scalar); 0 = head_dim, the usual.
  c.model.attn_logit_softcap = 0.0  # Soft-cap of the attention logits, cap * tanh(logits / cap), in every kernel but cuDNN (refused there) (Gemma 2: 50); 0 = none.
  c.model.final_logit_softcap = 0.0  # Soft-cap of the output logits, cap * tanh(logits / cap) (Gemma 2: 30); 0 = none.
  c.model.tie_embeddings = False  # Share the token embedding with the output projection.
  c.model.init_std = 0.02  # Standard deviation of the normal initialiser of every weight matrix.
  c.model.dtype = 'bfloat16'  # Compute dtype of activations and matmuls: float32 | bfloat16 | float16.
  c.model.param_dtype = 'float32'  # Storage dtype of the parameters (master weights).
  c.model.logits_dtype = 'float32'  # Dtype of the output logits fed to the loss.
  c.model.logits_chunks = 1  # >1: the losses (clm, mlm, SFT, DPO and kin, GRPO) compute the output head and their per-token values over this many strided chunks of the tokens, one at a time, each rematerialised in the backward pass, so the [batch, seq, vocab] logits never exist whole (llm_jax/model/output_head.py; MaxText's num_vocab_tiling): for long sequences with a large vocabulary, where the logits are the largest activations. data.seq_len must divide into logits_chunks * mesh.context.
  c.model.attention = 'auto'  # Attention kernel: auto | xla | cudnn | splash. auto: cudnn on GPU, splash on TPU, else xla.
  c.model.max_segments_per_row = 8  # cuDNN attention: runs of segment ids (documents, padding) per row the packed layout has room for; rows with more fall back to the dense mask at run time; 0 = always the dense mask.
  c.model.remat = 'none'  # Rematerialisation policy: none | full | save_matmuls | save_attention_out | minimal (projections and mlp_out kept, as MaxText's: the TPU choice) | minimal_with_context (projections, attention output and its cuDNN softmax statistics kept; not mlp_out: the GPU choice).
  c.model.scan_layers = True  # Stack the blocks with nn.scan (faster compile) instead of unrolling them.
  c.model.objective = 'clm'  # Training objective: clm (causal LM; SFT on sft_jsonl) | mlm (masked LM, bidirectional attention) | dpo (preference pairs of preference_jsonl / preference_hf: DPO, IPO, SimPO; config.dpo) | grpo (reinforcement learning from rewards on rollouts of prompts_jsonl / prompts_hf: GRPO and its variants; config.grpo, docs/rl.md).
  c.model.mask_token_id = 2  # mlm: input id of [MASK]; 2 = the tokenizer's reserved BOS, never in the data stream.

  c.data = ml_collections.ConfigDict()
  c.data.source = 'synthetic'  # Where text comes from: synthetic | stdlib | text_files | tfds | hf_datasets | mixture | sft_jsonl | sft_stdlib (instruction records made from the stdlib corpus: six lines of code asked, the next three answered) | preference_jsonl (chosen/rejected JSONL with a prompt, or its implicit prompt, as TRL reads them; data.preference_columns) | preference_hf (the same as Hugging Face dataset rows, data.hf_path) | preference_stdlib (pairs made from the stdlib corpus: real code chosen, its words shuffled rejected) | prompts_jsonl (records with a prompt, text or chat messages, and fields for the rewards: model.objective=grpo; data.prompt_columns) | prompts_hf (the same as Hugging Face dataset rows, data.hf_path).
  c.data.seq_len = 2048  # Tokens per training sequence (inputs and targets are each this long).
  c.data.global_batch_size = 8  # Sequences per optimizer step, over all processes and microbatches.
  c.data.seed = 0  # Seed of the data order; batch k is a pure function of (seed, k).
  c.data.packing = 'stream'  # stdlib / text_files / tfds / hf_datasets / mixture: how training rows are cut from the token stream: stream (windows of seq_len+1 consecutive tokens, no padding; a document is cut wherever a window ends) | documents (rows of whole documents for long-context training: one of at most seq_len+1 tokens is never cut, a longer one is cut every seq_len tokens from its start; first-fit into rows, the rest padded; llm_jax/data/document_packing.py).
  c.data.paths = ''  # text_files / sft_jsonl / preference_jsonl: comma-separated globs, files or folders of .txt, .md or .jsonl files.
  c.data.text_field = 'text'  # text_files / hf_datasets: the field holding the text in .jsonl records or dataset rows.
  c.data.document_separator = ''  # text_files: regular expression (multiline) between documents inside a .txt/.md file, e.g. '\n\s*\n' or '<\|endoftext\|>'; '' = one file is one document.
  c.data.hf_path = ''  # hf_datasets: first argument of datasets.load_dataset (hub name, local folder, or json/parquet/text), or a save_to_disk folder.
  c.data.hf_data_files = ''  # hf_datasets: comma-separated files or globs for the json/parquet/text loaders ('' = none).
  c.data.hf_name = ''  # hf_datasets: the dataset configuration name ('' = the default).
  c.data.preference_columns = ''  # preference_jsonl / preference_hf: the record's columns for our fields, as field=column pairs ('prompt=question,chosen=response_j,rejected=response_k'); '' = the columns prompt, chosen and rejected.
  c.data.prompt_columns = ''  # prompts_jsonl / prompts_hf: the record's columns for our fields, as field=column pairs ('prompt=question' for GSM8K: its answer column is already answer); every field is passed to the rewards; '' = the columns as they are (a prompt column is needed).
  c.data.hf_streaming = False  # hf_datasets: stream instead of downloading and caching (then prepared in one task).
  c.data.mixture = ''  # mixture: comma-separated PREPARED_DIR:WEIGHT, all prepared with the same tokenizer, e.g. '/d/web:0.7,/d/code:0.3'.
  c.data.filters = 'auto'  # Quality filters (datatrove), comma-separated: gopher_quality, gopher_repetition, c4_quality, fineweb_quality; '' = none; 'auto' = none for code (stdlib), whole-file documents and tfds, 'gopher_repetition' for parts of files and hf_datasets rows.
  c.data.near_dedup = False  # Drop near-duplicate documents (MinHash, across splits: train keeps the first, validation loses its twins).
  c.data.near_dedup_threshold = 0.8  # Estimated Jaccard similarity of word 5-grams at or above which two documents are near-duplicates.
  c.data.prepare_workers = 0  # Processes that prepare the data in parallel (datatrove LocalPipelineExecutor); 0 = the machine's cores for inputs over 64 MB, one below. The output does not depend on it.
  c.data.tfds_name = ''  # tfds: dataset name, e.g. 'lm1b' or 'wikitext/wikitext-103-raw-v1'.
  c.data.tfds_data_dir = ''  # tfds: data_dir of the prepared dataset ('' = the TFDS default).
  c.data.tfds_text_key = 'text'  # tfds: feature holding the text.
  c.data.train_split = 'train'  # Split used for training.
  c.data.eval_split = 'validation'  # Split used for evaluation.
  c.data.validation_fraction = 0.02  # stdlib / text_files / hf_datasets / sft_stdlib / preference_jsonl / preference_hf without both splits: share held out for validation, by a stable hash of each document's key; too few documents -> the tail share of tokens instead.
  c.data.tokenizer_path = ''  # Tokenizer to use: a SentencePiece .model, a Hugging Face tokenizer.json, or a directory with one; '' = train one on the corpus during preparation.
  c.data.tokenizer_type = 'bpe'  # Kind of a trained tokenizer: bpe | unigram (SentencePiece, tokenizer.model) | byte_bpe (byte-level BPE with Hugging Face tokenizers, tokenizer.json).
  c.data.tokenizer_character_coverage = 'auto'  # bpe / unigram: share of the sample's characters that get pieces of their own (SentencePiece character_coverage), the rest spelled as UTF-8 bytes; a number in (0, 1] as text, e.g. '0.98', or 'auto' = 0.9995 where the vocabulary has room for those characters, else lowered until the most frequent characters fill the vocabulary (large alphabets: Chinese, Japanese, Korean).
  c.data.add_bos = 'tokenizer'  # BOS at the start of every model input (pre-training documents, generation prompts, harness requests, the built-in SFT template, plain-text preference prompts): tokenizer (what the tokenizer itself adds, as transformers does by default: a Hugging Face tokenizer.json's post-processor, e.g. Llama 3.x, Llama 2 and Mistral imports; nothing for SentencePiece models and the tokenizers preparation trains) | always | never.
  c.data.prepared_dir = ''  # Where prepared token shards go; '' = <workdir>/data.
  c.data.min_doc_chars = 16  # Documents shorter than this (after cleaning) are dropped.
  c.data.max_docs = 0  # Read at most this many documents per split (0 = all); for quick experiments.
  c.data.mask_prob = 0.15  # mlm: fraction of tokens selected for prediction (80% [MASK], 10% random, 10% kept).
  c.data.sft_eval_paths = ''  # sft_jsonl: comma-separated globs of the eval records ('' = evaluate on the training records).
  c.data.sft_truncation = 'truncate'  # sft_jsonl / sft_stdlib: a record longer than seq_len+1 tokens: truncate (drop the oldest context first) | drop | error.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # Optimizer steps to train for.
  c.train.learning_rate = 3e-4  # Peak learning rate.
  c.train.warmup_steps = 100  # Linear warmup steps from 0 to the peak learning rate.
  c.train.schedule = 'cosine'  # Decay after warmup: cosine | linear | constant | wsd (warmup-stable-decay).
  c.train.wsd_decay_fraction = 0.1  # schedule=wsd: fraction of train.steps (the last ones) spent decaying.
  c.train.wsd_decay_shape = 'linear'  # schedule=wsd: decay curve from the peak to min_lr_ratio * peak: linear | cosine | sqrt (1 - sqrt).
  c.train.min_lr_ratio = 0.1  # Final learning rate as a fraction of the peak (cosine, linear, wsd).
  c.train.weight_decay = 0.1  # AdamW decoupled weight decay; never applied to norms and biases (1-D parameters).
  c.train.beta1 = 0.9  # AdamW beta1.
  c.train.beta2 = 0.95  # AdamW beta2.
  c.train.eps = 1e-8  # AdamW epsilon.
  c.train.z_loss = 0.0  # Coefficient of the z-loss, the mean of log(Z)^2 over target tokens added to the loss (PaLM: 1e-4); 0 = off.
  c.train.grad_clip = 1.0  # Clip gradients to this global norm (0 = no clipping).
  c.train.grad_accum_steps = 1  # Microbatches per step, accumulated inside the jitted step with lax.scan.
  c.train.moments_dtype = 'float32'  # Dtype of both AdamW moments: float32 | bfloat16 (halves optimizer memory).
  c.train.log_every = 10  # Write a metrics row (metrics.jsonl, TensorBoard, stdout) every this many steps.
  c.train.seed = 0  # Seed of parameter initialisation and of dropout-free model randomness.
  c.train.init_from = ''  # Workdir whose latest checkpoint initialises the parameters of a fresh run: any run of ours (pre-training, SFT, DPO, LoRA or not) or an imported model.
  c.train.init_from_adapters = 'merge'  # init_from a LoRA run: merge (its adapters folded into the weights, W + A.B.alpha/rank; a LoRA run then adds fresh adapters) | keep (this LoRA run continues from them: same lora.rank, alpha and targets; a DPO run then holds a copy of that starting point as its reference). A source without adapters loads as it is either way.
  c.train.nonfinite = 'stop'  # On NaN/Inf loss or gradients: stop (raise, naming the step) | skip (drop the update).
  c.train.max_nonfinite_skips = 5  # nonfinite=skip: stop after this many skipped steps in a row.
  c.train.profile_steps = ''  # 'FIRST,LAST' (1-based step numbers, FIRST >= 2, e.g. '5,8'): write a jax.profiler trace of those steps to <workdir>/profile/ (TensorBoard, Perfetto); '' = none.

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 500  # Evaluate every this many steps (0 = only at the end).
  c.eval.steps = 10  # Batches of the eval split per evaluation.
  c.eval.task_file = ''  # JSONL of {"prompt", "reference"} records scored (BLEU, ROUGE) at every evaluation; '' = none.
  c.eval.task_max_examples = 32  # Records of eval.task_file scored per evaluation (0 = all).
  c.eval.max_new_tokens = 32  # Tokens generated (greedy, to EOS) per task prompt, in the loop and by evaluate.
  c.eval.log_samples = 3  # Task completions logged per evaluation (metrics.jsonl and TensorBoard text).
  c.eval.harness_tasks = ''  # lm-evaluation-harness tasks (comma-separated) scored at every evaluation, logged as harness/<task>/<metric>; '' = none.
  c.eval.harness_include_path = ''  # Directory of local lm-evaluation-harness task YAMLs for eval.harness_tasks.
  c.eval.harness_limit = 0  # Documents per harness task scored in the loop (0 = all).

  c.tracking = ml_collections.ConfigDict()
  c.tracking.wandb_project = ''  # Weights & Biases project the run's metrics, config and samples go to; '' = no W&B.
  c.tracking.wandb_entity = ''  # W&B entity (user or team); '' = the default of the logged-in account.
  c.tracking.wandb_run_name = ''  # W&B run name; '' = the workdir's name.
  c.tracking.wandb_mode = 'online'  # online | offline (written under $WANDB_DIR, nothing sent; `wandb sync` later) | disabled.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500  # Save every this many steps (and always at the end); 0 = only at the end.
  c.checkpoint.keep = 3  # Checkpoints to keep (oldest are deleted).
  c.checkpoint.async_save = True  # Write checkpoints in the background while training goes on.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel mesh axis size (-1 = all devices the other axes leave).
  c.mesh.expert = 1  # Expert-parallel axis size: the experts of model.ffn=moe split over it (rule 'expert'); like data, it also splits the batch.
  c.mesh.fsdp = 1  # Fully-sharded data-parallel axis size: parameters and optimizer state sharded over it.
  c.mesh.context = 1  # Context-parallel axis size: every activation's sequence split over it (rule 'act_seq'), attention exchanging keys and values across it (llm_jax/model/context.py); weights stay sharded over it with fsdp (rule 'embed'). data.seq_len must divide into context chunks (2 * context with context_load_balance).
  c.mesh.context_exchange = 'all_gather'  # mesh.context > 1: how attention sees the other devices' keys and values: all_gather (gather K/V over the axis, then one kernel call, xla or splash; small with grouped-query attention) | ring (K/V blocks passed round the axis with ppermute, the next block's transfer issued before this block's compute, online-softmax accumulation: one block of K/V and a quarter block of the scores held at a time, in the backward pass too, pieces a causal mask hides skipped; xla kernel only). model.attention=cudnn is refused under either; auto takes xla on GPU and under ring.
  c.mesh.context_load_balance = False  # mesh.context > 1 and causal attention: device i holds sequence chunks i and 2*context-1-i (of 2*context), so causal work per device is even where the kernel skips masked blocks (splash); positions and segment ids move with their tokens, the model's output returns to input order.
  c.mesh.tensor = 1  # Tensor-parallel axis size: heads, MLP and vocabulary sharded over it.
  c.mesh.rules = DEFAULT_RULES  # Logical-axis rules: (logical name, mesh axis or tuple of axes or None).

  c.xla = ml_collections.ConfigDict()
  c.xla.options = ''  # XLA compiler options of the train and eval steps, XLA_FLAGS syntax: e.g. '--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false'.
  c.xla.gpu_memory_fraction = 0.0  # Share of GPU memory JAX reserves (XLA_PYTHON_CLIENT_MEM_FRACTION, set by main and the benchmark before the backend starts); 0 = JAX's default 0.75.

  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # model.objective=dpo: the beta of the loss (TRL's): the strength of the pull towards the reference (sigmoid, robust), IPO's regularisation tau, SimPO's reward scale.
  c.dpo.loss_type = 'sigmoid'  # sigmoid (DPO, TRL's sigmoid) | cdpo (conservative DPO: sigmoid with dpo.label_smoothing, what older TRL's sigmoid computed with label_smoothing > 0) | robust (robust DPO) | ipo (IPO, length-normalised) | simpo (SimPO: length-normalised, no reference model); formulas in llm_jax/objectives/preference.py.
  c.dpo.label_smoothing = 0.0  # Assumed share of flipped preference labels (< 0.5): cdpo (conservative DPO) and simpo smooth the loss with it, robust makes the unbiased robust-DPO loss; sigmoid takes none (as TRL's sigmoid: cDPO is loss_type=cdpo); ignored by ipo.
  c.dpo.simpo_gamma = 0.5  # loss_type=simpo: the target reward margin gamma (TRL's simpo_gamma).
  c.dpo.max_length = 0  # Tokens of one sequence, prompt + chosen or prompt + rejected (TRL's max_length); a pair of two such sequences fills a row of data.seq_len (positions restart for each sequence, so model.max_seq_len bounds this, not the row), so at most data.seq_len // 2 + 1 and model.max_seq_len; 0 = the smaller.
  c.dpo.max_prompt_length = 0  # A sequence longer than dpo.max_length keeps the last this-many prompt tokens first, then cuts both completions to the rest (TRL's order); 0 = dpo.max_length // 2.
  c.dpo.precompute_ref = False  # Compute the reference's summed completion log-probabilities of every pair once (two numbers a pair), before the first step (no gradient), and store them beside the prepared data (reference_logps/<split>-<pairs key>-<reference key>.npy); each batch reads its pairs' sums, so no reference copy is held and no reference forward runs per step. Ignored by simpo.
  c.dpo.reference_dtype = 'compute'  # Dtype of the frozen reference copy (no LoRA, no precompute_ref), which only runs forward passes: compute (model.dtype, giving the same forward; norm scales and the MoE router stay in param_dtype) | param (model.param_dtype, float32 by default).

  c.grpo = ml_collections.ConfigDict()
  c.grpo.group_size = 4  # model.objective=grpo: completions sampled per prompt, one group (TRL's num_generations); advantages compare a completion with its group.
  c.grpo.prompts_per_rollout = 2  # Prompts of one rollout; the rollout's prompts_per_rollout * group_size completions are one step's batch (data.global_batch_size must equal it).
  c.grpo.steps_per_rollout = 1  # Optimizer steps on each rollout (TRL's num_iterations); the rollout's log-probs are the old policy of the clipped ratio.
  c.grpo.max_completion_tokens = 32  # New tokens sampled at most per completion (TRL's max_completion_length; dr_grpo divides by it); a prompt gets data.seq_len - this tokens at most.
  c.grpo.temperature = 1.0  # Sampling temperature of the rollouts; the loss's log-probs are of logits / temperature, as TRL's.
  c.grpo.top_p = 1.0  # Nucleus sampling of the rollouts (1 = off).
  c.grpo.top_k = 0  # Top-k sampling of the rollouts (0 = off).
  c.grpo.loss_type = 'dapo'  # grpo (clipped ratio; per-completion token mean, then mean over completions) | bnpo (clipped ratio; token mean over the batch) | dr_grpo (clipped ratio; sum over tokens / (completions * max_completion_tokens)) | dapo (clipped ratio; token mean over the rollout; TRL's default) | cispo (the capped ratio, gradient stopped, times the log-prob: MiniMax-M1; token mean) | sapo (a sigmoid gate of the ratio instead of the clip; grpo's mean) | luspo (clipped sequence ratio, each completion's term times its length; needs importance_sampling_level=sequence) | vespo (a gamma weight of the completion's whole ratio, gradient stopped, times the log-prob; token mean; needs importance_sampling_level=token); formulas in docs/rl.md.
  c.grpo.importance_sampling_level = 'token'  # token (a ratio per token) | sequence (one ratio per completion, the geometric mean of its tokens': GSPO).
  c.grpo.epsilon = 0.2  # Clip range of the ratio below 1: [1 - epsilon, 1 + epsilon_high].
  c.grpo.epsilon_high = 0.0  # Clip range above 1 (DAPO's clip-higher, e.g. 0.28); 0 = epsilon. Under loss_type=cispo the cap of the ratio itself (TRL's; ScaleRL's epsilon_max, e.g. 5.0), which must be set (>= 1).
  c.grpo.sapo_temperature_pos = 1.0  # loss_type=sapo: the gate's temperature for completions of positive advantage (TRL's; the SAPO paper's).
  c.grpo.sapo_temperature_neg = 1.05  # loss_type=sapo: the gate's temperature for completions of zero or negative advantage.
  c.grpo.vespo_k_pos = 2.0  # loss_type=vespo: power of the completion's ratio in its weight, advantage >= 0 (down-weights ratios below 1; TRL's).
  c.grpo.vespo_lambda_pos = 3.0  # loss_type=vespo: decay of the weight with the ratio, advantage >= 0 (down-weights ratios above 1).
  c.grpo.vespo_k_neg = 3.0  # loss_type=vespo: the power for advantages < 0.
  c.grpo.vespo_lambda_neg = 2.0  # loss_type=vespo: the decay for advantages < 0.
  c.grpo.scale_rewards = 'group'  # Advantage = reward - its group's mean, divided by: group (the group's std) | batch (the rollout's std) | none (not divided: Dr. GRPO).
  c.grpo.beta = 0.0  # Weight of the KL to the reference (k3 estimator per token; the reference is the starting point, as DPO's: the init_from model or the LoRA base); 0 = no reference held.
  c.grpo.mask_truncated_completions = False  # Completions cut at max_completion_tokens (no EOS) count in no loss (DAPO).
  c.grpo.dynamic_sampling = False  # Drop groups whose rewards are all equal (no signal) and refill the batch with the groups of further prompts (DAPO).
  c.grpo.max_rollout_attempts = 4  # dynamic_sampling: rollouts at most to fill one batch; then the equal groups fill the rest (and count as zero_std_groups).
  c.grpo.rewards = 'exact_answer'  # Comma-separated reward functions, summed with grpo.reward_weights: built-ins exact_answer (the completion's final answer, after '####' or in \boxed{}, else its last number, equals the record's answer field) | format (the completion matches grpo.format_regex) | length (-(completion tokens) / max_completion_tokens); or module:function / path/to/file.py:function, called as f(prompts, completions, **fields) -> one float each.
  c.grpo.reward_weights = ''  # Comma-separated weights, one per reward ('' = 1 each).
  c.grpo.answer_field = 'answer'  # exact_answer: the record's field holding the reference answer (its final answer is extracted the same way).
  c.grpo.format_regex = ''  # format: a regular expression the whole completion must match (re.fullmatch, DOTALL) for reward 1, else 0.
  c.grpo.reward_timeout = 10.0  # Seconds a user reward function may take for one rollout (it runs in a worker thread); beyond that the run stops, naming it.
  c.grpo.log_samples_every = 10  # Write completions with their rewards to <workdir>/rollouts.jsonl every this many rollouts (0 = never).
  c.grpo.log_samples = 4  # Completions written per logged rollout.
  c.grpo.eval_prompts = 8  # Prompts of the eval split scored (greedy, one completion each) at every evaluation: eval_reward.

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # LoRA rank (0 = no adapters, train all parameters).
  c.lora.alpha = 16.0  # LoRA scale numerator: adapters are scaled by alpha / rank.
  c.lora.targets = 'q,k,v,o'  # Comma-separated projections that get adapters: q,k,v,o,gate,up,down.
  return c


def resolve_mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Sizes of MESH_AXES, with a single -1 replaced by the devices the others leave."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    fail(f'mesh.{free[1]}', f'only one mesh axis may be -1, got {free}')
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      fail(f'mesh.{axis}', f'must be a positive size or -1, got {size}')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      fail(f'mesh.{free[0]}', f'the other axes use {fixed} devices, which does not divide the {num_devices} available')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    fail('mesh', f'{"*".join(MESH_AXES)} = {"*".join(str(sizes[a]) for a in MESH_AXES)} = {fixed} '
          f'but {num_devices} devices are available')
  return sizes


# Logical parameter axis -> the config.model field giving its size.
_SHARDED_DIMS = {'vocab': 'vocab_size', 'embed': 'd_model', 'mlp': 'ffn_dim', 'heads': 'num_heads',
                 'kv_heads': 'num_kv_heads', 'expert': 'num_experts', 'expert_mlp': 'expert_ffn_dim'}


def _check_sharded_dims(config, mesh: dict[str, int]) -> None:
  """Each sharded model dimension must split evenly over the mesh axes its rule maps it to."""
  rules = {rule[0]: rule[1] for rule in config.mesh.rules}
  for axis, field in _SHARDED_DIMS.items():
    targets = rules.get(axis)
    targets = tuple(targets) if isinstance(targets, (tuple, list)) else (targets,)
    shards = math.prod(mesh[t] for t in targets if t is not None)
    if config.model[field] % shards:
      fail(f'model.{field}', f'{config.model[field]} does not split over mesh axes {"*".join(targets)} = '
            f'{shards} devices (rule {axis!r} -> {targets}); change the mesh sizes or config.mesh.rules')


def check_run(config, num_devices: int) -> dict[str, int]:
  """The run's own fields (mesh and rules, batch, loop cadences, checkpoints, evaluation, XLA, tracking);
  ConfigError naming the first bad one. Returns the resolved mesh shape. The parts' fields are checked by the
  parts (see the top of this module); llm_jax.validation.validate runs them all."""
  d, t = config.data, config.train
  check_choice('train.nonfinite', t.nonfinite, NONFINITE_POLICIES)
  check_choice('tracking.wandb_mode', config.tracking.wandb_mode, WANDB_MODES)
  check_choice('train.init_from_adapters', t.init_from_adapters, INIT_FROM_ADAPTERS)
  if t.init_from_adapters == 'keep' and not config.lora.rank:
    fail('train.init_from_adapters', 'keep continues the adapters of a LoRA run, so it needs lora.rank > 0 (the '
         "source's rank); use merge to fold them into the weights of a run without LoRA")
  if config.eval.harness_limit < 0:
    fail('eval.harness_limit', f'must be >= 0 (0 = all documents), got {config.eval.harness_limit}')
  if t.steps <= 0:
    fail('train.steps', f'must be positive, got {t.steps}')
  if t.z_loss < 0:
    fail('train.z_loss', f'must be >= 0, got {t.z_loss}')
  if t.grad_accum_steps <= 0:
    fail('train.grad_accum_steps', f'must be positive, got {t.grad_accum_steps}')
  if t.log_every <= 0:
    fail('train.log_every', f'must be positive, got {t.log_every}')
  if config.checkpoint.keep <= 0:
    fail('checkpoint.keep', f'must be positive, got {config.checkpoint.keep}')
  mesh = resolve_mesh_shape(config.mesh, num_devices)
  chunks = mesh['context'] * (2 if config.mesh.context_load_balance else 1)
  if mesh['context'] > 1 and d.seq_len % chunks:
    fail('data.seq_len', f'{d.seq_len} does not split into mesh.context * {2 if chunks != mesh["context"] else 1} = '
         f'{chunks} equal chunks (context parallelism{", load-balanced" if chunks != mesh["context"] else ""})')
  logits_chunks = config.model.logits_chunks
  if logits_chunks > 1 and d.seq_len % (logits_chunks * mesh['context']):
    fail('model.logits_chunks', f'data.seq_len = {d.seq_len} does not split into logits_chunks * mesh.context = '
         f'{logits_chunks}*{mesh["context"]} (each chunk of the loss is split over the context axis)')
  batch_shards = mesh['data'] * mesh['expert'] * mesh['fsdp']
  if d.global_batch_size % (batch_shards * t.grad_accum_steps):
    fail('data.global_batch_size', f'{d.global_batch_size} is not divisible by data*expert*fsdp*grad_accum_steps = '
         f'{mesh["data"]}*{mesh["expert"]}*{mesh["fsdp"]}*{t.grad_accum_steps} = {batch_shards * t.grad_accum_steps}')
  known_axes = {rule[0] for rule in config.mesh.rules}
  for rule in config.mesh.rules:
    targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for target in targets:
      if target is not None and target not in MESH_AXES:
        fail('mesh.rules', f'rule {tuple(rule)} names mesh axis {target!r}; mesh axes are {MESH_AXES}')
  for needed in ('embed', 'vocab', 'act_batch'):
    if needed not in known_axes:
      fail('mesh.rules', f'no rule for logical axis {needed!r}')
  _check_sharded_dims(config, mesh)
  if config.eval.every < 0 or config.checkpoint.every < 0:
    fail('eval.every' if config.eval.every < 0 else 'checkpoint.every', 'must be >= 0 (0 = only at the end)')
  if config.eval.steps <= 0:
    fail('eval.steps', f'must be positive, got {config.eval.steps}')
  if not 0.0 <= config.xla.gpu_memory_fraction <= 1.0:
    fail('xla.gpu_memory_fraction', f'must be in [0, 1] (0 = JAX default), got {config.xla.gpu_memory_fraction}')
  return mesh


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run wrote to <workdir>/config.json, laid over the base config (fields added since default).

  Used by generate, evaluate, convert and resume; raises FileNotFoundError naming the file when it is missing.
  """
  path = storage.join(workdir, 'config.json')
  storage.check_readable(workdir)
  if not storage.isdir(workdir):
    raise FileNotFoundError(f'{workdir}: no such workdir')
  if not storage.exists(path):
    raise FileNotFoundError(f'{path}: missing; is {workdir} a llm_jax workdir (made by training or convert)?')
  saved = json.loads(storage.read_text(path))
  config = get_config()
  for section, values in saved.items():
    if section not in config or not isinstance(values, dict):
      continue
    for key, value in values.items():
      if key in config[section]:
        if key == 'rules':
          value = tuple((rule[0], tuple(rule[1]) if isinstance(rule[1], list) else rule[1]) for rule in value)
        config[section][key] = value
  return config


def load_experiment(name_or_path: str) -> ml_collections.ConfigDict:
  """get_config() of a preset: 'tiny' (experiments/tiny.py in this checkout) or a path to any config file."""
  path = name_or_path
  if not path.endswith('.py'):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', f'{path}.py')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such config file')
  spec = importlib.util.spec_from_file_location(f'llm_jax_experiment_{os.path.basename(path)[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
