"""Every command in README.md and docs/*.md runs as written.

1. Each `python -m llm_jax...` line of a shell block (continuations joined) is checked statically: the module
   exists, every flag is one that job defines, the config file exists, and every `--config.a.b=v` override names a
   field of that config and its value parses as the field's type.
2. COVERAGE maps each command (by a pattern) to the test that runs that job with that preset on tiny settings
   (smaller steps, documents or model; some swap the corpus for the synthetic source), or says why it cannot run here (hardware, a bucket, the user's own data or weights, a download). A command no entry
   matches fails the test, and so does an entry that matches no command: a new command in the docs gets a line.
3. test_finetune_chain_runs_as_written runs the fine-tuning chain of docs/finetune.md and the README with the
   commands read from the markdown (their workdirs replaced by temporary ones, a few steps appended): pre-train ->
   LoRA SFT -> DPO (LoRA and full) -> convert to_hf -> transformers loads the export and generates the tokens
   llm_jax generates from the same workdir.
"""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from llm_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ['README.md'] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'docs', '*.md')))
SHELL_LANGUAGES = ('', 'bash', 'sh', 'shell', 'console')
ABSL_FLAGS = {'help', 'helpfull', 'helpshort', 'verbosity', 'v', 'logtostderr', 'alsologtostderr', 'flagfile'}


def doc_commands(path):
  """The `python -m llm_jax...` commands of the shell blocks of one markdown file, continuation lines joined,
  comments and an unmatched closing quote (a command inside srun "...") dropped."""
  commands, block, language = [], None, ''
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    lines = f.read().splitlines()
  for line in lines:
    if line.lstrip().startswith('```'):
      if block is None:
        block, language = [], line.strip()[3:].strip()
      else:
        if language in SHELL_LANGUAGES:
          text = re.sub(r'\\\n\s*', ' ', '\n'.join(block))
          for text_line in text.splitlines():
            found = re.search(r'python -m llm_jax\S*.*', text_line)
            if found:
              command = re.split(r'\s+#\s', found.group(0))[0].strip()
              for quote in '"\'':  # the end of a quoted `srun "..."` or `bash -c '...'`
                if command.count(quote) % 2 and command.endswith(quote):
                  command = command[:-1].strip()
              commands.append(' '.join(command.split()))
        block = None
      continue
    if block is not None:
      block.append(line)
  return commands


ALL = [(path, command) for path in DOC_FILES for command in doc_commands(path)]


def test_the_docs_have_commands_to_check():
  assert len(ALL) > 50 and any('sft_tiny.py --workdir=W2' in c for _, c in ALL), len(ALL)


# --- 1. static check -------------------------------------------------------------------------------------------------

def _job_flags(module: str) -> set:
  """The flags a job defines: DEFINE_* calls in its module (and cli.py, the benchmark's input module)."""
  files = [module.replace('.', '/') + '.py', 'llm_jax/cli.py']
  if module == 'llm_jax.benchmark':
    files.append('llm_jax/data/benchmark_input.py')
  names = set(ABSL_FLAGS)
  if module == 'llm_jax.serve':  # its engine flags are made from EngineConfig's fields
    from llm_jax import serve
    names |= {name for name, *_ in serve.engine_fields()}
  for name in files:
    with open(os.path.join(REPO, name), encoding='utf-8') as f:
      source = f.read()
    names |= set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source))
    names |= set(re.findall(r"define_config\w*\(\s*'(\w+)'", source))
  return names


def _typed(value: str, current):
  if isinstance(current, bool):
    assert value in ('True', 'False', 'true', 'false'), value
    return value.lower() == 'true'
  if isinstance(current, int):
    return int(value)
  if isinstance(current, float):
    return float(value)
  return value


@pytest.mark.parametrize('path, command', ALL, ids=[f'{p}:{i}' for i, (p, _) in enumerate(ALL)])
def test_command_names_real_modules_flags_and_fields(path, command):
  text = re.sub(r'\[(--[^\]]*)\]', r'\1', command)  # optional flags, written [--flag=value]
  words = shlex.split(text)
  assert words[:2] == ['python', '-m'], command
  module = words[2]
  assert os.path.exists(os.path.join(REPO, module.replace('.', '/') + '.py')), f'{path}: no module {module}'
  defined = _job_flags(module)
  config, config_file = None, None
  for word in words[3:]:
    if not word.startswith('--'):
      assert module == 'llm_jax.convert' and word in ('from_hf', 'to_hf'), f'{path}: {command}: {word!r}'
      continue
    name, _, value = word[2:].partition('=')
    if name == 'config':
      config_file = value
      continue
    if name.startswith('config.'):
      continue
    bare = name[2:] if name.startswith('no') and name[2:] in defined else name
    assert bare in defined, f'{path}: {command}: {module} defines no flag --{bare}'
  if config_file and config_file != '...':
    file_name, _, argument = config_file.partition(':')
    assert os.path.exists(os.path.join(REPO, file_name)), f'{path}: {command}: no config file {file_name}'
    # experiments/imported.py:W reads a workdir's config.json: its fields are the base config's
    config = config_lib.get_config() if argument else config_lib.load_experiment(os.path.join(REPO, file_name))
  elif any(w.startswith('--config.') for w in words):
    config = config_lib.get_config()  # evaluate's overrides of the workdir's config
  for word in words[3:]:
    if word.startswith('--config.'):
      field, _, value = word[len('--config.'):].partition('=')
      section, _, name = field.partition('.')
      assert section in config and name in config[section], f'{path}: {command}: no field config.{field}'
      config[section][name] = _typed(value, config[section][name])


# --- 2. which test runs each command --------------------------------------------------------------------------------

CHAIN = 'test_doc_commands.py::test_finetune_chain_runs_as_written'
NOT_RUN = 'not run here: '
SERVE = 'test_serve.py::test_models_health_and_greedy_completions_equal_the_in_process_engine'
COVERAGE = [  # (pattern searched in the command, the test that runs it or why none can)
    (r'serve --workdir=W( --port=8000| --model_name=W|)$', SERVE),
    (r'serve --workdir=W --host=0\.0\.0\.0 ',  # engine flags too (--max_seqs, --max_queue)
     'test_serve.py::test_queue_full_is_429_and_sigterm_finishes_running_requests_then_exits_0'),
    (r'main --config=experiments/moe_tiny\.py --workdir=/tmp/pre ', 'test_moe.py::test_aux_terms_are_a_mean_per_token_under_every_objective'),
    (r'main --config=experiments/dpo_tiny\.py --workdir=/tmp/dpo --config\.train\.init_from=/tmp/pre ',
     'test_moe.py::test_aux_terms_are_a_mean_per_token_under_every_objective'),  # the DPO objective on MoE rows
    (r'main --config=experiments/tiny\.py --workdir=/tmp/tiny$', CHAIN),
    (r'main --config=experiments/sft_tiny\.py --workdir=W2 --config\.train\.init_from=W$', CHAIN),
    (r'main --config=experiments/dpo_tiny\.py --workdir=W5 --config\.train\.init_from=W$', CHAIN),
    (r'main --config=experiments/tiny\.py --workdir=/tmp/tiny --config\.train\.steps=200$', CHAIN),
    (r'main --config=experiments/dpo_tiny\.py --workdir=/tmp/dpo_tiny --config\.train\.init_from=/tmp/tiny$', CHAIN),
    (r'generate --workdir=W --prompt="def main\(" --max_new_tokens=64', CHAIN),
    (r'evaluate --workdir=W \[--task_file', CHAIN),
    (r'convert to_hf --workdir=(/runs/llama31_8b_dpo|/tmp/llm_jax_tiny|/tmp/dpo_lora)', CHAIN),
    (r'main --config=experiments/sft_tiny\.py --workdir=/tmp/sft_tiny --config\.train\.init_from=/tmp/tiny$', CHAIN),
    (r'main --config=experiments/dpo_tiny\.py --workdir=/tmp/dpo_lora --config\.train\.init_from=/tmp/sft_tiny '
     r'--config\.lora\.rank=8$', CHAIN),
    (r'main --config=experiments/sft_tiny\.py --workdir=/tmp/sft_(mine|full) .*my_data', NOT_RUN + "the user's JSONL "
     'records (my_data/): the sft_jsonl source is run by test_sft.py::test_instruction_set_learnt_by_greedy_generation, '
     'this preset by the chain'),
    (r'main --config=experiments/tiny\.py --workdir=(W|/tmp/llm_jax_tiny|/tmp/tiny_short)'
     r'( --config\.train\.steps=\d+( --config\.data\.max_docs=\d+)?)?$', CHAIN),  # tiny on the stdlib corpus
    (r'main --config=experiments/tiny\.py --workdir=(/tmp/synth --config\.data\.source=synthetic|/tmp/moe_run_tiny)$',
     'test_train.py::test_sigterm_saves_and_exits_zero_then_resumes'),
    (r'main --config=experiments/tiny\.py --workdir=W --config\.train\.profile_steps=5,8',
     'test_xla_and_profile.py::test_profile_steps_write_a_trace_in_training_and_the_benchmark'),
    (r'main --config=experiments/mlm_tiny\.py --workdir=\S+$',
     'test_mlm.py::test_mlm_loss_falls_well_below_unigram_baseline'),  # its model on the stdlib corpus, 300 steps
    (r'main --config=experiments/moe_tiny\.py --workdir=\S+$',  # (the preset itself: test_config.py, test_moe.py::
     'test_moe.py::test_log_steps_carry_the_per_layer_expert_load'),  # test_presets_moe_tiny_matches_tiny_per_token...)
    (r'main --config=experiments/grpo_tiny\.py --workdir=(W6|/tmp/grpo_tiny)$',  # the preset on a smaller rollout,
     'test_grpo.py::test_grpo_run_logs_rollouts_and_resumes_exactly'),  # 4 steps (the full run: docs/rl.md)
    (r'data\.prepare --config=experiments/tiny\.py --workdir=(W|/tmp/llm_jax_tiny)$',
     'test_data_prepare.py::test_command_line'),
    (r'generate --workdir=/tmp/llm_jax_tiny --(prompt|prompts_file)=', 'test_generate.py::test_cli_prints_completions'),
    (r'evaluate --workdir=/tmp/(llm_jax_tiny|sft_tiny)', 'test_evaluate.py::test_cli_scores_a_task_file'),
    (r'plot --workdir=', 'test_plot.py::test_command_writes_png'),
    (r'benchmark --config=experiments/tiny\.py', 'test_benchmark.py::test_cli_on_cpu_with_tiny_config'),
    (r'--dry_run', NOT_RUN + 'compiles a large preset (minutes); the dry run itself: test_dry_run.py::'
     'test_main_dry_run_cli, --target: test_aot.py'),
    (r'experiments/(125m|1b|7b|lm1b|llama3_8b|llama3_8b_long|llama3_2_1b|mixtral_8x7b)\.py',
     NOT_RUN + 'a preset too large for the test machine (fields and flags checked above)'),
    (r'gs://|s3://', NOT_RUN + 'needs a bucket; the same jobs against emulators: test_object_store.py'),
    (r'/models/|/runs/|/data/|llama_dir|--hf_dir=(D|Llama-3\.2-1B-Instruct) |chat/\*|/tmp/sft_run|experiments/imported\.py',
     NOT_RUN + "needs the user's data or downloaded weights (from_hf on random models: test_convert.py)"),
    (r'harness --workdir=W', NOT_RUN + 'downloads benchmark data; the job on a local task: test_harness.py::'
     'test_cli_prints_the_results_and_importing_train_needs_no_lm_eval'),
    (r'--config=\.\.\.', NOT_RUN + 'a template (--config=...), not a command'),
]


def _covering(command):
  return [target for pattern, target in COVERAGE if re.search(pattern, command)]


@pytest.mark.parametrize('path, command', ALL, ids=[f'{p}:{i}' for i, (p, _) in enumerate(ALL)])
def test_every_command_is_run_by_a_named_test_or_says_why_not(path, command):
  assert _covering(command), (f'{path}: `{command}` is run by no test: add a COVERAGE line naming the test that '
                              'runs it on tiny settings (or why it cannot run here)')


def test_every_coverage_line_matches_a_command_and_names_a_real_test():
  for pattern, target in COVERAGE:
    assert any(re.search(pattern, command) for _, command in ALL), f'COVERAGE {pattern!r} matches no command'
    if target.startswith(NOT_RUN):
      continue
    file_name, test_name = target.split('::')
    with open(os.path.join(REPO, 'tests', file_name), encoding='utf-8') as f:
      assert re.search(rf'^def {test_name}\(', f.read(), re.M), f'{target} does not exist'


# --- 3. the fine-tuning chain, as written -----------------------------------------------------------------------------

def doc_command(path, contains):
  found = [c for c in doc_commands(path) if contains in c]
  assert found, f'{path} has no command with {contains!r}'
  return found[0]


def as_written(command, workdirs, *extra):
  """The argv of a doc command with its workdir-like flag values replaced (workdirs: value -> path) and `extra`
  flags appended (absl: a later flag wins)."""
  words = shlex.split(re.sub(r'\[(--[^\]]*)\]', '', command))
  out = []
  for word in words[1:]:  # 'python' -> this interpreter
    name, eq, value = word.partition('=')
    if eq and name in ('--workdir', '--config.train.init_from', '--hf_dir') and value in workdirs:
      word = f'{name}={workdirs[value]}'
    out.append(word)
  return [sys.executable] + out + list(extra)


def run(argv, timeout=600):
  # as a user runs them: one CPU device, not the suite's 8 fake ones (the presets' batches are sized for a laptop)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if not f.startswith('--xla_force_host_platform_device_count'))
  result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, f'{" ".join(argv)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}'
  return result.stdout


TINY = ['--config.data.max_docs=60', '--config.eval.every=0', '--config.eval.steps=1', '--config.checkpoint.every=0']


@pytest.mark.slow
def test_finetune_chain_runs_as_written(tmp_path):
  """pre-train -> LoRA SFT -> DPO with and without LoRA from the SFT run -> to_hf -> transformers generates what
  llm_jax generates (greedy, 8 tokens) from the DPO LoRA workdir (its adapters merged by the export)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  w = {name: str(tmp_path / name) for name in ('tiny', 'sft', 'dpo_lora', 'dpo_full', 'hf')}
  run(as_written(doc_command('docs/finetune.md', 'experiments/tiny.py --workdir=/tmp/tiny'), {'/tmp/tiny': w['tiny']},
                 '--config.train.steps=10', *TINY))
  sft = doc_command('README.md', 'experiments/sft_tiny.py --workdir=W2')
  out = run(as_written(sft, {'W2': w['sft'], 'W': w['tiny']}, '--config.train.steps=4', *TINY))
  assert f'initialised parameters from {w["tiny"]}' in out
  assert json.load(open(os.path.join(w['sft'], 'config.json')))['lora']['rank'] == 8  # the preset's LoRA
  dpo_lora = doc_command('docs/finetune.md', 'experiments/dpo_tiny.py --workdir=/tmp/dpo_lora')
  dpo_full = doc_command('README.md', 'experiments/dpo_tiny.py --workdir=W5')
  for name, argv in (('dpo_lora', as_written(dpo_lora, {'/tmp/dpo_lora': w['dpo_lora'], '/tmp/sft_tiny': w['sft']})),
                     ('dpo_full', as_written(dpo_full, {'W5': w['dpo_full'], 'W': w['sft']}))):
    out = run(argv + ['--config.train.steps=2', '--config.train.log_every=1', *TINY])
    assert f'initialised parameters from {w["sft"]} (step 4, its rank-8 adapters merged into the weights)' in out
    assert json.load(open(os.path.join(w[name], 'config.json')))['lora']['rank'] == (8 if name == 'dpo_lora' else 0)
    rows = [json.loads(line) for line in open(os.path.join(w[name], 'metrics.jsonl'))]
    first = next(r for r in rows if 'loss' in r)
    # step 1: the policy is the reference (the SFT model, merged), so every reward is 0 and the loss ln 2
    assert abs(first['loss'] - 0.6931472) < 1e-5 and first['rewards/margins'] == 0.0, first
  generated = run(as_written(doc_command('README.md', 'llm_jax.generate --workdir=W --prompt='), {'W': w['dpo_full']},
                             '--max_new_tokens=4'))
  assert generated.strip()
  evaluated = run(as_written(doc_command('README.md', 'llm_jax.evaluate --workdir=W'), {'W': w['sft']}))
  assert json.loads(evaluated)['perplexity']['perplexity'] > 1  # the SFT run's validation records (sft_stdlib)
  run(as_written(doc_command('docs/finetune.md', 'convert to_hf --workdir=/tmp/dpo_lora'),
                 {'/tmp/dpo_lora': w['dpo_lora'], '/tmp/dpo_lora_hf': w['hf']}))

  from llm_jax import decoding
  from llm_jax import workdir as workdir_lib
  loaded = workdir_lib.load_workdir(w['dpo_lora'], need_tokenizer=True)
  prompt = loaded.tokenizer.encode('def main(')
  ours = decoding.generate(loaded.model_config, loaded.params, [prompt], 8)[0]
  model = transformers.AutoModelForCausalLM.from_pretrained(w['hf'], dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(w['hf'])
  with torch.no_grad():
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
  assert theirs == list(ours)[:len(theirs)] and len(theirs) == 8, (theirs, ours)
  assert isinstance(tokenizer.decode(theirs), str)
