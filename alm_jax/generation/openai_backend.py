"""The OpenAI-compatible backend: the engine's generator interface over an existing serving engine
(vLLM, SGLang, or `alm serve`), through the official `openai` client.

    gen = OpenAIGenerator("http://127.0.0.1:8000/v1", model="smollm2", tokenizer_dir="models/smollm2")
    generate_corpus(out, source, recipe, gen, n_records=..., records_per_shard=...)

A prompt is the chat messages themselves (`ChatPrompt`, a tuple of messages whose `len` is its token count
under the local tokenizer when one is given, for the engine's `max_prompt_tokens` check). Up to
`batch_size` requests run concurrently. A request's `seed` is `sampling.seed + row id` (the item index),
so a server that honours seeds answers an item the same way in any batch or process.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from alm_jax.errors import ConfigError


class ChatPrompt(tuple):
    """The chat messages of one prompt; `len()` = its token count (0 when no tokenizer was given)."""

    def __new__(cls, messages, n_tokens: int):
        obj = super().__new__(cls, tuple(messages))
        obj.n_tokens = n_tokens
        return obj

    def __len__(self) -> int:
        return self.n_tokens


class OpenAIGenerator:
    """The engine's generator interface (`prompt_ids`, `generate`, `load`, `name`, `max_prompt_tokens`,
    `tokens_generated`) answered by an OpenAI-compatible `/v1/chat/completions` endpoint."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 tokenizer_dir: str | os.PathLike | None = None, batch_size: int = 16, max_new_tokens: int = 64,
                 max_prompt_tokens: int = 4096, sampling=None, stop_strings: Sequence[str] = (),
                 timeout: float = 600.0, name: str | None = None):
        try:
            import openai
        except ImportError as e:   # pragma: no cover - in the test extra
            raise ConfigError("--backend openai needs the `openai` package: pip install openai") from e
        from alm_jax.generation.sampler import SamplingConfig
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "EMPTY"),
                                    timeout=timeout, max_retries=2)
        if model is None:
            models = [m.id for m in self.client.models.list().data]
            if not models:
                raise ConfigError(f"{base_url} serves no model; pass --model")
            model = models[0]
        self.model, self.batch_size = model, batch_size
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
        self.stop_strings = tuple(stop_strings)
        self.tokenizer = None
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.name = name or model
        self.tokens_generated = 0
        self.seconds_generating = 0.0

    def load(self) -> None:
        """Nothing to load: the server holds the model."""

    def prompt_ids(self, messages: Sequence[dict[str, str]], assistant_prefix: str = "") -> ChatPrompt:
        if assistant_prefix:
            raise ConfigError("this recipe prefills the assistant turn (assistant_prefix); the OpenAI chat API "
                              "cannot continue a started answer: use the native backend or turn the option off")
        n = 0
        if self.tokenizer is not None:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ChatPrompt(messages, n)

    def generate(self, prompts: Sequence[ChatPrompt], row_ids: Sequence[int] | None = None,
                 max_new: Sequence[int] | None = None, sampling=None) -> list:
        import time

        from alm_jax.generation.engine import Response
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        max_new = [self.max_new_tokens] * len(prompts) if max_new is None else list(max_new)
        s = sampling or self.sampling
        if s.think_budget:
            raise ConfigError("a thinking budget needs the native backend (a remote server does its own budget "
                              "forcing, if any); use --backend native or set recipe.thinking_budget=0")

        def one(k: int) -> Response:
            out = self.client.chat.completions.create(
                model=self.model, messages=list(prompts[k]), max_tokens=max_new[k], temperature=s.temperature,
                top_p=s.top_p, seed=s.seed + row_ids[k], stop=list(self.stop_strings) or None)
            choice = out.choices[0]
            n = out.usage.completion_tokens if out.usage is not None else 0
            return Response(text=(choice.message.content or "").strip(), n_tokens=n,
                            finished=choice.finish_reason == "stop")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:
            responses = list(pool.map(one, range(len(prompts))))
        self.seconds_generating += time.perf_counter() - t0
        self.tokens_generated += sum(r.n_tokens for r in responses)
        return responses
