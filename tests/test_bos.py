"""BOS where the model expects one: Llama 3.x, Llama 2 and Mistral imports against transformers' default behaviour.

Each case is a tiny random transformers model (float32, CPU) with a tokenizer built here, no downloads: Llama 3.x
a byte-level BPE tokenizer.json whose post-processor prepends `<|begin_of_text|>` (ByteLevel + TemplateProcessing,
as the release), Llama 2 and Mistral a SentencePiece model turned into a tokenizer.json by transformers'
LlamaTokenizer with add_bos_token (Metaspace, TemplateProcessing `<s> $A`, as the releases). Each is imported
with convert.from_hf, then compared with what transformers does by default, `tokenizer(text)` (BOS prepended):
token ids, greedy generation, the prepared pre-training stream and its perplexity, and lm_eval's own `hf` backend
(its default add_bos_token=None) request by request: loglikelihood, loglikelihood_rolling, generate_until.
Negative controls show that the same comparisons fail without the BOS.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

from llm_jax import config as config_lib, convert, evaluate, workdir as workdir_lib  # noqa: E402
from llm_jax.data import preference, sft, tokenizer as tokenizer_lib  # noqa: E402

torch.set_num_threads(1)
WORDS = ('the quick brown fox jumps over lazy dog def main argv return model must be used with tokenizer it was '
         'trained alpha beta gamma value index table river stone').split()
TEXTS = ['the quick brown fox jumps over the lazy dog ' * 4, 'def main(argv):\n  return 0',
         'a model must be used with the tokenizer it was trained with', 'alpha beta gamma']
MODEL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False)
CASES = {  # name -> (config class, model class, tokenizer kind, extra config fields)
    'llama3': ('LlamaConfig', 'LlamaForCausalLM', 'llama3', {}),
    'llama2': ('LlamaConfig', 'LlamaForCausalLM', 'llama2', {}),
    'mistral': ('MistralConfig', 'MistralForCausalLM', 'llama2', dict(sliding_window=16)),
}


def lines(n=120, seed=0):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, size=int(rng.integers(3, 10)))) for _ in range(n)] + TEXTS


def llama3_tokenizer(directory):
  """Byte-level BPE with Llama 3's special tokens and its post-processor (ByteLevel, then BOS + $A)."""
  from tokenizers import processors
  tok = tokenizers.Tokenizer.from_str(tokenizer_lib.train(lines(), 300, 'byte_bpe').decode())
  tok.add_special_tokens(['<|begin_of_text|>', '<|end_of_text|>'])
  bos = tok.token_to_id('<|begin_of_text|>')
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single='<|begin_of_text|> $A', pair='<|begin_of_text|> $A <|begin_of_text|> $B:1',
                                    special_tokens=[('<|begin_of_text|>', bos)])])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(dict(tokenizer_class='PreTrainedTokenizerFast', bos_token='<|begin_of_text|>',
                   eos_token='<|end_of_text|>', clean_up_tokenization_spaces=False, model_max_length=64), f)


def sentencepiece_dir(directory, add_bos=True):
  """tokenizer.model (SentencePiece BPE, <s> = 2, </s> = 1) and a LlamaTokenizer tokenizer_config.json."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'tokenizer.model'), 'wb') as f:
    f.write(tokenizer_lib.train(lines(), 300, 'bpe'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(dict(tokenizer_class='LlamaTokenizer', add_bos_token=add_bos, add_eos_token=False, bos_token='<s>',
                   eos_token='</s>', unk_token='<unk>', model_max_length=64), f)


def llama2_tokenizer(directory):
  """The SentencePiece model through transformers' LlamaTokenizer, saved: a Llama 2 / Mistral style tokenizer.json."""
  source = directory + '_sp'
  sentencepiece_dir(source)
  transformers.AutoTokenizer.from_pretrained(source).save_pretrained(directory)


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """name -> (HF dir, transformers model, transformers tokenizer, workdir)."""
  cache = {}

  def get(name):
    if name not in cache:
      config_cls, model_cls, kind, extra = CASES[name]
      root = tmp_path_factory.mktemp(name)
      hf_dir, workdir = str(root / 'hf'), str(root / 'work')
      (llama3_tokenizer if kind == 'llama3' else llama2_tokenizer)(hf_dir)
      tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
      torch.manual_seed(0)
      hf_config = getattr(transformers, config_cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                     eos_token_id=tok.eos_token_id, **MODEL, **extra)
      model = getattr(transformers, model_cls)(hf_config).eval()
      model.save_pretrained(hf_dir)
      convert.from_hf(hf_dir, workdir, dtype='float32')
      cache[name] = (hf_dir, model, tok, workdir)
    return cache[name]
  return get


@pytest.mark.parametrize('name', list(CASES))
def test_import_adds_what_transformers_adds(imported, name):
  hf_dir, _, theirs, workdir = imported(name)
  ours = tokenizer_lib.load_from_workdir(workdir)
  assert ours.kind == 'hf' and ours.add_bos and not ours.add_eos
  assert ours.input_prefix == (theirs.bos_token_id,)
  for text in TEXTS + [' leading space', 'x']:
    assert ours.encode_input(text) == theirs(text).input_ids, text
    assert ours.encode_prompt(text) == theirs(text).input_ids, text
    assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
  assert tokenizer_lib.load_from_workdir(workdir, 'never').encode_input('x') == theirs('x').input_ids[1:]
  assert config_lib.load_workdir_config(workdir).data.add_bos == 'tokenizer'  # the tokenizer.json says it
  lengths = evaluate.token_byte_lengths(ours)  # bits per byte: BOS spells no byte
  for text in TEXTS:
    dummy_prefix = int(name != 'llama3')  # Metaspace (Llama 2, Mistral) writes a space before the first word
    assert int(lengths[ours.encode_input(text)].sum()) == len(text.encode('utf-8')) + dummy_prefix, text


def test_own_tokenizers_keep_adding_nothing_unless_told(tmp_path):
  """A SentencePiece model and a trained byte-level BPE add no BOS ('tokenizer', the default); 'always' adds the
  BOS piece, 'never' takes an imported one away; an unknown setting names the field."""
  sentencepiece_dir(str(tmp_path / 'sp'))
  path = str(tmp_path / 'sp' / 'tokenizer.model')
  assert tokenizer_lib.load(path).encode_input('the fox') == tokenizer_lib.load(path).encode('the fox')
  always = tokenizer_lib.load(path, 'always')
  assert always.encode_input('the fox') == [tokenizer_lib.BOS_ID] + always.encode('the fox')
  with open(tmp_path / 'tokenizer.json', 'wb') as f:
    f.write(tokenizer_lib.train(lines(), 300, 'byte_bpe'))
  trained = tokenizer_lib.load(str(tmp_path / 'tokenizer.json'))
  assert not trained.add_bos and not trained.add_eos and trained.encode_input('x') == trained.encode('x')
  with pytest.raises(tokenizer_lib.TokenizerError, match=r'^config\.data\.add_bos: unknown value'):
    tokenizer_lib.load(path, 'sometimes')


def test_sentencepiece_only_import_records_add_bos_in_the_config(tmp_path):
  """A Llama 2 folder with tokenizer.model and no tokenizer.json: add_bos_token of tokenizer_config.json becomes
  data.add_bos=always, so every path of the imported workdir prepends <s>."""
  hf_dir = str(tmp_path / 'hf')
  sentencepiece_dir(hf_dir)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=300, **MODEL)).save_pretrained(hf_dir)
  config = convert.from_hf(hf_dir, str(tmp_path / 'work'), dtype='float32')
  assert config.data.add_bos == 'always'
  loaded = workdir_lib.load_workdir(str(tmp_path / 'work'), devices=jax.devices()[:1])
  assert loaded.tokenizer.kind == 'sentencepiece' and loaded.prompt_encoder()('the fox')[0] == tokenizer_lib.BOS_ID
  convert.to_hf(str(tmp_path / 'work'), str(tmp_path / 'export'))  # and the export says so to transformers
  exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'export'))
  assert exported('the fox').input_ids[0] == tokenizer_lib.BOS_ID
  sentencepiece_dir(hf_dir, add_bos=False)
  assert convert.from_hf(hf_dir, str(tmp_path / 'work2'), dtype='float32').data.add_bos == 'tokenizer'


@pytest.mark.parametrize('name', list(CASES))
def test_greedy_generation_equals_transformers_default(imported, name):
  """generate's path (generate.run: the serving engine, raw prompts) against model.generate(**tokenizer(prompt)),
  greedy; the control: transformers without the BOS continues otherwise for some prompt. A text prompt sent to the
  engine itself is encoded the same way."""
  from llm_jax import generate, serving
  _, model, tok, workdir = imported(name)
  prompts = ['the quick brown', 'def main(', 'a model must', 'alpha']
  ours = generate.run(workdir, prompts, max_new_tokens=10, temperature=0.0, devices=jax.devices()[:1])

  def theirs(prompt, add_special_tokens=True):
    ids = tok(prompt, return_tensors='pt', add_special_tokens=add_special_tokens).input_ids
    with torch.no_grad():
      out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

  assert ours == [theirs(p) for p in prompts]
  assert ours != [theirs(p, add_special_tokens=False) for p in prompts]
  if name == 'llama3':
    engine = serving.Engine.from_workdir(workdir)
    request = engine.add_request('the quick brown', serving.SamplingParams(max_tokens=1, temperature=0.0))
    assert engine._requests[request].prompt == tok('the quick brown').input_ids  # pylint: disable=protected-access


def test_chat_free_fine_tuning_prompts_start_with_bos(imported):
  """The built-in SFT template and plain-text preference prompts start with the BOS the tokenizer adds."""
  _, _, tok, workdir = imported('llama2')
  ours = tokenizer_lib.load_from_workdir(workdir)
  tokens, loss = sft.render(ours, [dict(role='user', content='hi'), dict(role='assistant', content='there')])
  assert tokens[0] == tok.bos_token_id and not loss[0] and tokens.count(tok.bos_token_id) == 1
  assert sft.encode_prompt(ours, 'hi')[0] == tok.bos_token_id
  prompt, chosen, rejected = preference.tokenize(ours, dict(prompt='the fox', chosen=' jumps', rejected=' sat'), 'x')
  assert prompt == tok('the fox').input_ids and chosen[-1] == rejected[-1] == tok.eos_token_id
  assert tok.bos_token_id not in chosen + rejected


def test_pretraining_documents_and_perplexity_equal_transformers(imported, tmp_path):
  """Data prepared with the imported tokenizer: every document of the stream is transformers' tokenizer(doc)
  followed by EOS; evaluate's loss over the batches equals transformers' log-likelihood of the same segments
  (each document scored from its BOS, as transformers scores tokenizer(doc)), within 1e-4 relative."""
  hf_dir, model, tok, workdir = imported('llama3')
  data_dir = tmp_path / 'text'
  data_dir.mkdir()
  docs = [' '.join(lines(40, seed=i)[i:i + 3]) for i in range(24)]
  for i, doc in enumerate(docs):
    (data_dir / f'd{i:02d}.txt').write_text(doc)
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  config = config_lib.load_workdir_config(run)
  config.data.update(source='text_files', paths=str(data_dir / '*.txt'), seq_len=32, global_batch_size=4,
                     validation_fraction=0.25, min_doc_chars=1)
  config.eval.steps = 2
  with open(os.path.join(run, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  from llm_jax import data
  data.prepare(config, run)
  split = data.pipeline.open_split(config, 'validation', run)
  stream = split.stream.read_rows(np.array([0]), split.stream.num_tokens)[0]
  expected_docs = {tuple(tok(d).input_ids + [tok.eos_token_id]) for d in docs}
  ends = np.flatnonzero(stream == tok.eos_token_id)
  assert ends.size >= 3 and ends[-1] == stream.size - 1 and stream[0] == tok.bos_token_id
  found = [tuple(int(t) for t in stream[a + 1:b + 1]) for a, b in zip(np.r_[-1, ends[:-1]], ends)]
  assert all(d in expected_docs for d in found)
  result = evaluate.run(run, split='validation', devices=jax.devices()[:1])['perplexity']
  total = 0.0
  count = 0
  for batch in _batches(config, run, 2):
    for row in range(batch['inputs'].shape[0]):
      for segment in np.unique(batch['segment_ids'][row]):
        if segment == 0:
          continue
        where = batch['segment_ids'][row] == segment
        inputs, targets = batch['inputs'][row][where], batch['targets'][row][where]
        mask = batch['loss_mask'][row][where] > 0
        with torch.no_grad():
          logits = model(torch.tensor(inputs[None].astype(np.int64))).logits[0].double()
        logp = torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets.astype(np.int64))]
        total -= float(logp[torch.tensor(mask)].sum())
        count += int(mask.sum())
  assert count == result['tokens']
  assert result['loss'] == pytest.approx(total / count, rel=1e-4)
  assert result['bits_per_byte'] and result['bits_per_byte'] > 0


def _batches(config, workdir, n):
  import itertools
  from llm_jax import data
  return list(itertools.islice(data.make_iterator(config, 'validation', 0, workdir=workdir), n))


@pytest.mark.parametrize('name', ['llama3', 'mistral'])
def test_harness_equals_lm_eval_hf_backend_with_its_defaults(imported, name):
  """The same requests (tests/test_harness.py's multiple choice, rolling documents, generation prompts, and an
  empty context) to `llm_jax` on the imported workdir and to lm_eval's own `hf` backend (HFLM) on the original
  folder with its defaults (the tokenizer's BOS; prefix token = BOS): every log-likelihood within 1e-4 relative,
  the same is_greedy flags and generations. The control: without the BOS (add_bos=never) every rolling
  log-likelihood differs."""
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM
  from llm_jax import harness
  from test_harness import PROMPTS, QUESTIONS, TEXTS as DOCUMENTS
  hf_dir, _, tok, workdir = imported(name)
  ours = harness.LlmJaxLM(workdir=workdir, batch_size=4, devices=jax.devices()[:1])
  theirs = HFLM(pretrained=hf_dir, dtype='float32', device='cpu', max_length=ours.max_length, batch_size=4)
  assert ours.prefix_token_id == theirs.prefix_token_id == tok.bos_token_id
  pairs = [(q, c) for q, choices, _ in QUESTIONS for c in choices] + [('', ' the quick fox')]
  choice = [Instance('loglikelihood', {}, pair, i) for i, pair in enumerate(pairs)]
  rolling = [Instance('loglikelihood_rolling', {}, (text,), i) for i, text in enumerate(DOCUMENTS)]
  until = dict(until=['\n'], max_gen_toks=6, do_sample=False)
  generation = [Instance('generate_until', {}, (p, until), i) for i, p in enumerate(PROMPTS)]
  expected, got = theirs.loglikelihood(choice), ours.loglikelihood(choice)
  np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], rtol=1e-4)
  assert [g[1] for g in got] == [e[1] for e in expected]
  expected_rolling = np.array(theirs.loglikelihood_rolling(rolling), np.float64)
  np.testing.assert_allclose(ours.loglikelihood_rolling(rolling), expected_rolling, rtol=1e-4)
  assert ours.generate_until(generation) == theirs.generate_until(generation)
  loaded = ours.loaded
  without = workdir_lib.LoadedModel(runtime=loaded.runtime, params=loaded.params, step=loaded.step,
                                    tokenizer=tokenizer_lib.load_from_workdir(workdir, 'never'))
  control = np.array(harness.LlmJaxLM(loaded=without, batch_size=4).loglikelihood_rolling(rolling))
  assert np.all(np.abs(control - expected_rolling) > 1e-3 * np.abs(expected_rolling))
