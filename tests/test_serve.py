"""The OpenAI-compatible server as a real process on localhost (`python -m llm_jax.serve` on a tiny trained
workdir), driven with the official `openai` client and with httpx: completions and chat, streaming and not, n > 1,
seeds, stop strings, logprobs; greedy outputs equal to the in-process engine's, echoed prompt logprobs equal to a
full forward pass (the runtime's token_logprobs, not the engine); OpenAI's error JSON with the right statuses;
200 concurrent requests of which some are malformed and some disconnect mid-stream, after which the page pool is
empty and the server still serves; a full queue answers 429; SIGTERM finishes what runs and exits 0; lm-eval's
`local-completions` against the server scores as the in-process backend does."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip('fastapi')
pytest.importorskip('uvicorn')
openai = pytest.importorskip('openai')
httpx = pytest.importorskip('httpx')

from helpers import REPO  # noqa: E402
from test_generate import trained_workdir  # noqa: E402

# The shared server's engine (and the in-process reference's): few rows and pages, so few shapes to compile.
ENGINE_FLAGS = ('--max_seqs=4', '--page_size=16')
PROMPTS = ['the quick brown', 'def main(argv):\n  ', 'a model must be used with', 'the lazy']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Server:
  """`python -m llm_jax.serve` on a free port, its output in files; ready once /health answers."""

  def __init__(self, workdir, directory, *flags):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]),
               XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
    self.out, self.err = (open(os.path.join(directory, f'server-{self.port}.{n}'), 'w+') for n in ('out', 'err'))
    self.process = subprocess.Popen([sys.executable, '-m', 'llm_jax.serve', f'--workdir={workdir}',
                                     f'--port={self.port}', *flags], cwd=REPO, env=env, stdout=self.out,
                                    stderr=self.err, text=True)
    deadline = time.monotonic() + 300
    while True:
      if self.process.poll() is not None:
        raise AssertionError(f'the server exited with {self.process.returncode}: {self.stderr()[-3000:]}')
      try:
        if httpx.get(f'{self.url}/health', timeout=1).status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.monotonic() < deadline, self.stderr()[-3000:]
      time.sleep(0.2)

  def stderr(self) -> str:
    self.err.seek(0)
    return self.err.read()

  def stdout(self) -> str:
    self.out.seek(0)
    return self.out.read()

  def stop(self):
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(60)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.out.close()
    self.err.close()


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return trained_workdir(str(tmp_path_factory.mktemp('serve')))


@pytest.fixture(scope='module')
def server(workdir, tmp_path_factory):
  s = Server(workdir, str(tmp_path_factory.mktemp('server')), *ENGINE_FLAGS)
  yield s
  s.stop()


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=f'{server.url}/v1', api_key='unused', max_retries=0, timeout=120)


@pytest.fixture(scope='module')
def loaded(workdir):
  from llm_jax import workdir as workdir_lib
  return workdir_lib.load_workdir(workdir, devices=jax.devices()[:1])


@pytest.fixture(scope='module')
def engine(loaded):
  """The engine the server runs, in this process, with the same settings."""
  from llm_jax.serving.engine import Engine, EngineConfig
  config = EngineConfig(**{f[2:].split('=')[0]: int(f.split('=')[1]) for f in ENGINE_FLAGS})
  return Engine(loaded.model_config, loaded.params, loaded.tokenizer, config, loaded.runtime.mesh,
                loaded.runtime.rules, 'run')


def _greedy(engine, prompts, max_tokens, **settings):
  from llm_jax.serving.sampling import SamplingParams
  return engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, **settings))


def test_models_health_and_greedy_completions_equal_the_in_process_engine(server, client, engine, loaded):
  (model,) = client.models.list().data
  assert model.id == 'run' and model.max_model_len == 64
  assert httpx.get(f'{server.url}/health').json() == {'status': 'ok'}
  out = client.completions.create(model='run', prompt=PROMPTS, max_tokens=8, temperature=0)
  expected = _greedy(engine, PROMPTS, 8)
  assert [c.index for c in out.choices] == list(range(len(PROMPTS)))
  assert [c.text for c in out.choices] == [e.outputs[0].text for e in expected]
  assert [c.finish_reason for c in out.choices] == [e.outputs[0].finish_reason for e in expected]
  assert any(c.text for c in out.choices)
  prompt_tokens = sum(len(loaded.tokenizer.encode(p)) for p in PROMPTS)
  completion_tokens = sum(len(e.outputs[0].token_ids) for e in expected)
  assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
      prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
  # token ids in, the same text out; a list of token-id lists is a batch
  ids = loaded.tokenizer.encode(PROMPTS[1])
  assert client.completions.create(model='run', prompt=ids, max_tokens=8, temperature=0).choices[0].text == \
      expected[1].outputs[0].text
  both = client.completions.create(model='run', prompt=[ids, loaded.tokenizer.encode(PROMPTS[0])], max_tokens=8,
                                   temperature=0)
  assert [c.text for c in both.choices] == [expected[1].outputs[0].text, expected[0].outputs[0].text]


def test_streaming_equals_the_whole_answer_and_stop_strings_cut_it(client):
  response = client.completions.create(model='run', prompt=PROMPTS[0], max_tokens=12, temperature=0)
  whole = response.choices[0]
  chunks = list(client.completions.create(model='run', prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                          stream=True, stream_options=dict(include_usage=True)))
  assert ''.join(c.choices[0].text for c in chunks if c.choices) == whole.text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
  assert chunks[-1].usage == response.usage
  # a stop string from inside the greedy text: the answer ends just before it, streamed or not
  text = whole.text
  assert len(text.strip()) >= 4, text
  stop = text[len(text) // 2:len(text) // 2 + 2]
  cut = text[:text.index(stop)]
  stopped = client.completions.create(model='run', prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
  assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (cut, 'stop')
  streamed = client.completions.create(model='run', prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop,
                                       stream=True)
  assert ''.join(c.choices[0].text for c in streamed) == cut


def test_chat_uses_the_workdirs_template_streams_and_samples_n_with_a_seed(client, loaded):
  from llm_jax.data import sft
  messages = [dict(role='system', content='be brief'), dict(role='user', content='the quick brown')]
  out = client.chat.completions.create(model='run', messages=messages, max_tokens=6, temperature=0)
  prompt = sft.encode_chat_prompt(loaded.tokenizer, messages)  # the built-in template: the tokenizer has none
  assert loaded.tokenizer.decode(prompt).startswith('<|system|>')
  expected = client.completions.create(model='run', prompt=prompt, max_tokens=6, temperature=0).choices[0].text
  assert out.choices[0].message.content == expected
  assert out.choices[0].message.role == 'assistant'
  assert out.usage.prompt_tokens == len(prompt)
  chunks = list(client.chat.completions.create(model='run', messages=messages, max_tokens=6, temperature=0,
                                               stream=True))
  assert chunks[0].choices[0].delta.role == 'assistant'
  assert ''.join(c.choices[0].delta.content or '' for c in chunks) == expected
  # n > 1 sampled with a seed: n answers, the same again with the same seed
  sample = lambda seed: client.chat.completions.create(model='run', messages=messages, max_tokens=8, n=3,
                                                       temperature=1.0, seed=seed)
  first, again = sample(7), sample(7)
  assert [c.index for c in first.choices] == [0, 1, 2]
  assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
  assert 0 < first.usage.completion_tokens <= 3 * 8
  # chat logprobs: one entry a token, top_logprobs sorted, the chosen token's logprob among them when greedy
  lp = client.chat.completions.create(model='run', messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                      top_logprobs=3)
  content = lp.choices[0].logprobs.content
  assert len(content) == lp.usage.completion_tokens and ''.join(t.token for t in content) == \
      lp.choices[0].message.content
  for entry in content:
    values = [t.logprob for t in entry.top_logprobs]
    assert len(values) == 3 and values == sorted(values, reverse=True)
    assert entry.logprob == pytest.approx(values[0], abs=1e-6)  # greedy: the chosen token is the most likely


def test_echo_logprobs_equal_a_full_forward_pass(client, loaded):
  """lm-eval's loglikelihood request (echo, logprobs=1, max_tokens=1) and max_tokens=0: the prompt's logprobs are
  those of the runtime's full forward pass (not the paged engine), within 1e-4."""
  text = PROMPTS[2] + ' the tokenizer'
  ids = loaded.tokenizer.encode(text)
  reference = loaded.runtime.token_logprobs(loaded.params, np.array([ids[:-1]], np.int32),
                                            np.array([ids[1:]], np.int32))[0][0]
  for max_tokens in (0, 1):
    out = client.completions.create(model='run', prompt=text, max_tokens=max_tokens, echo=True, logprobs=1,
                                    temperature=0).choices[0]
    assert out.text.startswith(loaded.tokenizer.decode(ids))
    got = out.logprobs.token_logprobs
    assert len(got) == len(ids) + max_tokens and got[0] is None
    np.testing.assert_allclose(got[1:len(ids)], reference, atol=1e-4)
    assert ''.join(out.logprobs.tokens) == out.text
    assert all(len(top) <= 2 for top in out.logprobs.top_logprobs[1:])
  assert out.logprobs.top_logprobs[0] is None
  streamed = list(client.completions.create(model='run', prompt=text, max_tokens=1, echo=True, logprobs=1,
                                            temperature=0, stream=True))
  assert ''.join(c.choices[0].text for c in streamed) == out.text
  assert [v for c in streamed for v in c.choices[0].logprobs.token_logprobs] == got


def _post(url, body, raw=False):
  return httpx.post(url, content=body if raw else json.dumps(body), headers={'Content-Type': 'application/json'},
                    timeout=60)


def _error(response, status, param=None):
  assert response.status_code == status, response.text
  error = response.json()['error']
  assert set(error) == {'message', 'type', 'param', 'code'} and error['message']
  if param is not None:
    assert error['param'] == param, error
  return error


def test_errors_are_openai_json_with_the_right_status(server, client):
  url = f'{server.url}/v1/completions'
  _error(_post(url, b'{"prompt": "x", ', raw=True), 400)
  assert 'unknown field' in _error(_post(url, dict(model='run', prompt='x', max_tokenz=3)), 400, 'max_tokenz')['message']
  _error(_post(url, dict(model='run', prompt='x', max_tokens='many')), 400, 'max_tokens')
  _error(_post(url, dict(model='run')), 400, 'prompt')
  _error(_post(url, dict(model='nope', prompt='x')), 404, 'model')
  _error(_post(url, dict(model='run', prompt='x', temperature=-1)), 400, 'temperature')
  message = _error(_post(url, dict(model='run', prompt='the quick brown', max_tokens=100)), 400, 'max_tokens')['message']
  assert '64' in message
  _error(_post(url, dict(model='run', prompt='x' * 300, max_tokens=1)), 400, 'prompt')
  _error(_post(f'{server.url}/v1/chat/completions', dict(model='run', messages=[dict(role='wizard', content='x')])),
         400, 'messages[0].role')
  _error(httpx.get(f'{server.url}/v1/nothing_here'), 404)
  with pytest.raises(openai.BadRequestError) as e:  # what the official client makes of it
    client.completions.create(model='run', prompt='the quick brown', max_tokens=1000)
  assert e.value.status_code == 400 and e.value.body['param'] == 'max_tokens'
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model='nope', prompt='x', max_tokens=1)


def _metrics(url) -> dict[str, float]:
  text = httpx.get(f'{url}/metrics').text
  return {m.group(1): float(m.group(2)) for m in re.finditer(r'^(llm_jax_\w+) ([0-9.e+-]+)$', text, re.M)}


@pytest.mark.slow
def test_200_concurrent_requests_with_malformed_and_disconnecting_ones(server):
  """140 well-formed (streaming or not, greedy, mixed prompts and lengths), 25 malformed, 25 that disconnect after
  their first streamed chunk, 10 not streaming that give up before their answer: every well-formed one gets the text it gets alone, the others their error, and
  afterwards nothing runs or waits, no page is held, and the server still answers."""
  url = f'{server.url}/v1/completions'
  alone = lambda i, n: _post(url, dict(model='run', prompt=PROMPTS[i], max_tokens=n, temperature=0)).json()
  expected = {(i, n): alone(i, n)['choices'][0]['text'] for i in range(len(PROMPTS)) for n in (3, 7)}

  async def well_formed(k, client):
    i, n, stream = k % len(PROMPTS), (3, 7)[k % 2], k % 3 == 0
    body = dict(model='run', prompt=PROMPTS[i], max_tokens=n, temperature=0, stream=stream)
    if not stream:
      response = await client.post(url, json=body)
      assert response.status_code == 200, response.text
      return response.json()['choices'][0]['text'] == expected[i, n]
    text = ''
    async with client.stream('POST', url, json=body) as response:
      assert response.status_code == 200
      async for line in response.aiter_lines():
        if line.startswith('data: ') and line != 'data: [DONE]':
          text += json.loads(line[6:])['choices'][0]['text']
    return text == expected[i, n]

  async def malformed(k, client):
    body = [b'{"model": "run", "prompt": ', json.dumps(dict(model='run', prompt='x', bogus=1)).encode(),
            json.dumps(dict(model='run', prompt='the lazy', max_tokens=500)).encode()][k % 3]
    response = await client.post(url, content=body, headers={'Content-Type': 'application/json'})
    return response.status_code == 400 and 'error' in response.json()

  async def disconnecting(k, client):
    body = dict(model='run', prompt=PROMPTS[k % len(PROMPTS)], max_tokens=40, temperature=0, stream=True)
    async with client.stream('POST', url, json=body) as response:
      async for line in response.aiter_lines():
        if line.startswith('data: '):
          break  # leave with the stream open: the connection closes under the server
    return True

  async def impatient(k, client):  # not streaming: gives up before the answer, closing the connection
    body = dict(model='run', prompt=PROMPTS[k % len(PROMPTS)], max_tokens=40, temperature=0, ignore_eos=True)
    try:
      response = await client.post(url, json=body, timeout=0.2)
    except httpx.TimeoutException:
      return True
    return response.status_code == 200  # answered within 0.2 s: nothing to abort

  async def main():
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
      kinds = [well_formed] * 140 + [malformed] * 25 + [disconnecting] * 25 + [impatient] * 10
      order = np.random.default_rng(0).permutation(len(kinds))
      return await asyncio.gather(*[kinds[j](int(j), client) for j in order])

  results = asyncio.run(main())
  assert all(results), results.count(False)
  deadline = time.monotonic() + 60
  while True:
    m = _metrics(server.url)
    if m['llm_jax_running'] == m['llm_jax_waiting'] == m['llm_jax_pages_used'] == 0:
      break
    assert time.monotonic() < deadline, m
    time.sleep(0.2)
  assert m['llm_jax_pages_total'] > 0 and m['llm_jax_generated_tokens_total'] > 140 * 3
  assert m['llm_jax_time_to_first_token_seconds_count'] >= 140
  assert _post(url, dict(model='run', prompt=PROMPTS[0], max_tokens=3, temperature=0)).json()['choices'][0][
      'text'] == expected[0, 3]


@pytest.mark.slow
def test_queue_full_is_429_and_sigterm_finishes_running_requests_then_exits_0(workdir, tmp_path):
  server = Server(workdir, str(tmp_path), '--max_seqs=1', '--max_queue=1')
  try:
    url = f'{server.url}/v1/completions'
    body = dict(model='run', prompt=PROMPTS[0], max_tokens=40, temperature=0, ignore_eos=True)

    async def burst():
      async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(*[client.post(url, json=body) for _ in range(6)])

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 200 in statuses, statuses
    full = _error(next(r for r in responses if r.status_code == 429), 429)
    assert 'max_queue' in full['message'] and full['type'] == 'rate_limit_error'
    assert all(r.json()['choices'][0]['finish_reason'] == 'length' for r in responses if r.status_code == 200)
    # SIGTERM while a request streams: it finishes whole, the server refuses new work and exits 0
    with httpx.stream('POST', url, json=dict(body, stream=True), timeout=300) as response:
      lines = response.iter_lines()
      first = next(line for line in lines if line.startswith('data: '))
      server.process.send_signal(signal.SIGTERM)
      rest = [line for line in lines if line.startswith('data: ')]
    chunks = [json.loads(line[6:]) for line in [first] + rest if line != 'data: [DONE]']
    assert rest[-1] == 'data: [DONE]' and chunks[-1]['choices'][0]['finish_reason'] == 'length'
    assert server.process.wait(120) == 0, server.stderr()[-3000:]
    assert f'serving run on http://127.0.0.1:{server.port}' in server.stdout()
  finally:
    server.stop()


@pytest.mark.slow
def test_lm_eval_local_completions_scores_as_the_in_process_backend(server, workdir, tmp_path):
  import lm_eval
  from lm_eval.tasks import TaskManager
  from llm_jax import harness
  from test_harness import write_tasks
  tasks_dir = write_tasks(str(tmp_path / 'tasks'))
  names = ['mc_local', 'gen_local']
  ours = harness.evaluate(harness.LlmJaxLM(workdir=workdir, devices=jax.devices()[:1]), names,
                          include_path=tasks_dir, log_samples=True)
  theirs = lm_eval.simple_evaluate(
      model='local-completions',
      model_args=dict(base_url=f'{server.url}/v1/completions', model='run', tokenizer_backend='remote',
                      tokenized_requests=True, num_concurrent=4, max_length=64, max_retries=1),
      tasks=names, task_manager=TaskManager(include_path=tasks_dir), batch_size=4, log_samples=True,
      bootstrap_iters=0)
  for metric in ('acc,none', 'acc_norm,none'):
    assert ours['results']['mc_local'][metric] == theirs['results']['mc_local'][metric]
  samples = lambda out, task: sorted(out['samples'][task], key=lambda s: s['doc_id'])
  mc = lambda out: np.array([[float(r[0]) for r in s['filtered_resps']] for s in samples(out, 'mc_local')])
  np.testing.assert_allclose(mc(theirs), mc(ours), rtol=1e-4)
  generations = lambda out: [s['filtered_resps'][0] for s in samples(out, 'gen_local')]
  assert generations(theirs) == generations(ours)
