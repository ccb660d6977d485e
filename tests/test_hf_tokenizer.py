"""Hugging Face tokenizers (tokenizer.json) and chat templates, against transformers' own fast tokenizer.

A byte-level BPE tokenizer.json is trained in the test (llm_jax.data.tokenizer.train_byte_bpe), given two chat
special tokens and a ChatML-style template with transformers' {% generation %} markers, then used through prepare,
SFT and generate; ids, the SFT loss mask and generated text are compared with transformers (PreTrainedTokenizerFast,
apply_chat_template with return_assistant_tokens_mask, AutoModelForCausalLM.generate on the exported folder).
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')
tokenizers = pytest.importorskip('tokenizers')
pytest.importorskip('jinja2')

from llm_jax import config as config_lib, convert, generate, train  # noqa: E402
from llm_jax.data import preparation, sft, tokenizer as tokenizer_lib  # noqa: E402

torch.set_num_threads(1)
WORDS = ('alpha beta gamma delta value return model token data train über naïve print self index table river '
         'stone light sound').split()
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
            "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT = [dict(role='system', content='You answer briefly.'), dict(role='user', content='alpha beta?'),
        dict(role='assistant', content='gamma delta.'), dict(role='user', content='  über  naïve\n'),
        dict(role='assistant', content='value\n  return 0')]


def documents(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return ['\n'.join(' '.join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(int(rng.integers(2, 5))))
          for _ in range(n)]


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
  """tokenizer.json (byte-level BPE, 400 ids + 2 chat tokens) and tokenizer_config.json with the template."""
  directory = tmp_path_factory.mktemp('hf_tokenizer')
  lines = [line for doc in documents() for line in doc.split('\n')]
  trained = tokenizers.Tokenizer.from_str(tokenizer_lib.train(lines, 400, 'byte_bpe').decode())
  trained.add_special_tokens(['<|im_start|>', '<|im_end|>'])
  trained.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps(dict(
      tokenizer_class='PreTrainedTokenizerFast', eos_token='<|im_end|>', pad_token='<pad>', bos_token=None,
      unk_token='<unk>', chat_template=TEMPLATE, clean_up_tokenization_spaces=False)))
  return str(directory)


def test_trained_byte_bpe_is_lossless_with_reserved_ids(tok_dir):
  tok = tokenizer_lib.load(os.path.join(tok_dir, 'tokenizer.json'))
  assert tok.kind == 'hf' and tok.chat_template == TEMPLATE
  assert (tok.pad_id, tok.unk_id, tok.eos_id) == (0, 3, tok.encode('<|im_end|>')[0])
  for text in documents(5, seed=1) + ['  indented\n\ttab  ', 'emoji 🦙 and ünïcödé']:
    assert tok.decode(tok.encode(text)) == text
  assert tokenizer_lib.load(tok_dir).fingerprint == tok.fingerprint  # a directory loads its tokenizer.json


def test_ids_equal_transformers_fast_tokenizer(tok_dir):
  ours = tokenizer_lib.load(tok_dir)
  theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
  for text in documents(8, seed=2) + ['<|im_start|>user\nhi<|im_end|>', ' leading space', 'über naïve 🦙']:
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
  assert theirs.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.pad_id


def test_prepare_with_a_given_tokenizer_json(tok_dir, tmp_path):
  docs = documents(12, seed=3)
  (tmp_path / 'text').mkdir()
  for i, doc in enumerate(docs):
    (tmp_path / 'text' / f'd{i}.txt').write_text(doc)
  config = config_lib.get_config()
  config.model.update(vocab_size=402, max_seq_len=64)
  config.data.update(source='text_files', paths=f'{tmp_path}/text/*.txt', seq_len=32, min_doc_chars=1,
                     tokenizer_path=os.path.join(tok_dir, 'tokenizer.json'), validation_fraction=0.3)
  workdir = str(tmp_path / 'work')
  index = preparation.prepare(config, workdir, progress=False)
  assert index['tokenizer']['file'] == 'tokenizer.json'
  assert sorted(os.listdir(workdir)) == ['data', 'tokenizer.fingerprint', 'tokenizer.json', 'tokenizer_config.json']
  theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
  eos = theirs.eos_token_id
  stream = np.concatenate([np.concatenate(preparation.read_split_tokens(os.path.join(workdir, 'data'), index, role))
                           for role in ('train', 'validation')]).tolist()
  found = sorted(tuple(stream[a + 1:b]) for a, b in zip([-1] + [i for i, t in enumerate(stream) if t == eos][:-1],
                                                         [i for i, t in enumerate(stream) if t == eos]))
  assert found == sorted(tuple(theirs.encode(doc, add_special_tokens=False)) for doc in docs)


def test_prepare_trains_a_byte_bpe_tokenizer(tmp_path):
  (tmp_path / 'text').mkdir()
  for i, doc in enumerate(documents(30, seed=4)):
    (tmp_path / 'text' / f'd{i}.txt').write_text(doc)
  config = config_lib.get_config()
  config.model.update(vocab_size=320, max_seq_len=64)
  config.data.update(source='text_files', paths=f'{tmp_path}/text/*.txt', seq_len=32, min_doc_chars=1,
                     tokenizer_type='byte_bpe', validation_fraction=0.3)
  workdir = str(tmp_path / 'work')
  preparation.prepare(config, workdir, progress=False)
  tok = tokenizer_lib.load_from_workdir(workdir)
  assert tok.kind == 'hf' and tok.path.endswith('tokenizer.json') and tok.vocab_size <= 320
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(workdir, 'tokenizer.json'))
  text = documents(1, seed=5)[0]
  assert tok.encode(text) == theirs.encode(text, add_special_tokens=False)
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)


def test_sft_with_chat_template_masks_exactly_the_assistant_spans(tok_dir, tmp_path):
  path = tmp_path / 'chat.jsonl'
  path.write_text(json.dumps({'messages': CHAT}) + '\n' + json.dumps({'prompt': 'data?', 'response': 'river'}) + '\n')
  tok = tokenizer_lib.load(tok_dir)
  examples, _ = sft.read_examples([str(path)], tok, seq_len=200, policy='error')
  theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
  for example, messages in zip(examples, (CHAT, [dict(role='user', content='data?'),
                                                 dict(role='assistant', content='river')])):
    out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert example.tokens.tolist() == list(out['input_ids'])
    assert example.loss.astype(int).tolist() == list(out['assistant_masks'])
  loss_text = tok.decode(examples[0].tokens[examples[0].loss].tolist())  # special tokens dropped
  assert loss_text == 'gamma delta.value\n  return 0'
  end = tok.encode('<|im_end|>')[0]
  assert [t for t, counts in zip(examples[0].tokens, examples[0].loss) if counts and t == end] == [end, end]


def test_template_that_rewrites_history_is_refused(tok_dir, tmp_path):
  tok = tokenizer_lib.load(tok_dir)
  tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}"
  path = tmp_path / 'chat.jsonl'
  path.write_text(json.dumps({'messages': CHAT}) + '\n')
  with pytest.raises(sft.SFTDataError, match=r'chat.jsonl:1: .*messages\[2\] \(assistant\): the template does not'):
    sft.read_examples([str(path)], tok, seq_len=200, policy='error')


@pytest.fixture(scope='module')
def exported(tok_dir, tmp_path_factory):
  """A random tiny model with the tokenizer bound, and its export."""
  root = tmp_path_factory.mktemp('export')
  tok = tokenizer_lib.load(tok_dir)
  config = config_lib.get_config()
  config.model.update(vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64,
                      max_seq_len=64, dtype='float32', init_std=0.2)
  config.data.seq_len = 32
  workdir = str(root / 'work')
  tokenizer_lib.bind_to_workdir(tok_dir, workdir)
  params = jax.tree.map(np.asarray, nn.unbox(train.init_params_fn(config, train.create_model(config))(
      jax.random.key(0))))
  convert.write_workdir(config, params, workdir, dict(model=config.model.to_dict(),
                                                      tokenizer_fingerprint=tok.fingerprint))
  hf_dir = str(root / 'hf')
  files = convert.to_hf(workdir, hf_dir)
  assert {'tokenizer.json', 'tokenizer_config.json'} <= set(files)
  return workdir, hf_dir


@pytest.mark.parametrize('chat', [False, True])
def test_export_loads_with_auto_classes_and_generates_the_same_text(exported, chat):
  workdir, hf_dir = exported
  theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  prompt = 'alpha beta gamma delta value'
  if chat:
    ids = theirs.apply_chat_template([dict(role='user', content=prompt)], add_generation_prompt=True, tokenize=True)
    ids = list(ids['input_ids'] if isinstance(ids, dict) or hasattr(ids, 'keys') else ids)
  else:
    ids = theirs.encode(prompt, add_special_tokens=False)
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                         pad_token_id=theirs.pad_token_id)
  expected = theirs.decode(out[0, len(ids):], skip_special_tokens=True)
  assert len(expected) > 10  # a real continuation, not an immediate EOS
  ours = generate.run(workdir, [prompt], max_new_tokens=12, temperature=0.0, devices=jax.devices()[:1], chat=chat)
  assert ours == [expected]
