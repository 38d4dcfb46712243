"""The OpenAI-compatible path: a real HTTP server on loopback (`ChatServer`, our sampler) answering the
official `openai` client, and the engine writing the same corpus through it as with the native generator."""

import json
import urllib.request

import pytest

from alm_jax.data.corpus import Corpus
from alm_jax.data.sources.demo import DemoSource
from alm_jax.generation.engine import ResponseGenerator, generate_corpus
from alm_jax.generation.openai_backend import OpenAIGenerator
from alm_jax.generation.server import ChatServer
from alm_jax.recipes.desta import DestaRecipe

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def smollm2_server(demo_models):
    gen = ResponseGenerator(demo_models.llm, batch_size=4, max_new_tokens=24, max_prompt_tokens=256,
                            prompt_bucket=256)     # one prompt bucket: one compiled program for everything
    server = ChatServer(gen, host="127.0.0.1", port=0).start()
    yield server, gen
    server.stop()


@pytest.mark.slow
def test_server_answers_the_openai_client_like_the_native_sampler(smollm2_server, demo_models):
    server, gen = smollm2_server
    assert server.host == "127.0.0.1"
    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY")
    assert [m.id for m in client.models.list().data] == [server.model_name]
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    out = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=24)
    native = gen.generate([gen.prompt_ids(messages)])[0]
    assert out.choices[0].message.content == native.text and len(native.text.split()) >= 3
    assert out.usage.completion_tokens == native.n_tokens
    assert out.choices[0].finish_reason == ("stop" if native.finished else "length")
    short = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    # a bad request is a 400 with a message, not a dead server
    req = urllib.request.Request(f"{server.base_url}/chat/completions", data=json.dumps({"messages": []}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 400 and "messages" in json.loads(err.value.read())["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=500)


@pytest.mark.slow
def test_engine_writes_the_same_corpus_through_the_server(smollm2_server, demo_models, tmp_path):
    server, gen = smollm2_server
    source = DemoSource(seed=2, n_clips=4, kinds=("events",), max_duration=3.0)
    generate_corpus(tmp_path / "native", source, DestaRecipe(seed=1), gen, n_records=4, records_per_shard=4)
    remote = OpenAIGenerator(server.base_url, tokenizer_dir=demo_models.llm, batch_size=4, max_new_tokens=24,
                             max_prompt_tokens=256)
    generate_corpus(tmp_path / "remote", source, DestaRecipe(seed=1), remote, n_records=4, records_per_shard=4)
    texts = lambda d: [(r.metadata["item_index"], r.messages[-1]["content"]) for r in Corpus(d)]  # noqa: E731
    assert texts(tmp_path / "remote") == texts(tmp_path / "native") and len(texts(tmp_path / "native")) >= 2
    assert remote.tokens_generated > 0
