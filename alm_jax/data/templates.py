"""Chat messages -> token ids with audio placeholder spans and a loss mask.

The LLM's own chat template renders the conversation; each `<audio>` placeholder in a message becomes a
span of exactly `span_lengths[i]` placeholder ids (clip i's token count from the connector), and the loss
mask is 1 exactly on assistant content tokens and the end-of-turn (EOS) token that closes them. A clip's span
may be followed by text ids of its own (`span_suffixes`: DeSTA's transcript tokens), which are plain text
positions (`audio_clip` -1) that the LLM embeds like any other token.

    ids       <|im_start|>user\n  [A A A A]  what is this?<|im_end|>\n<|im_start|>assistant\n  a dog barks <|im_end|> \n
    loss      0 ...............................................................................  1  1   1    1     0
    audio     -1 ...             0 1 2 3     -1 ...
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from alm_jax.data.records import AUDIO_PLACEHOLDER
from alm_jax.errors import DataError

_PIECE_CACHE_SIZE = 4096   # rendered prompts / tokenized prompt pieces kept per ChatTokenizer (then it starts over)


@dataclasses.dataclass(frozen=True)
class TokenizedSample:
    """ids `[T]`, loss_mask `[T]` (1 on assistant tokens + EOS), and for every position the audio token it
    holds: `audio_clip[t]` (clip index or -1) and `audio_pos[t]` (token index inside that clip's span)."""
    ids: np.ndarray
    loss_mask: np.ndarray
    audio_clip: np.ndarray
    audio_pos: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class ChatTokenizer:
    """Wraps an HF tokenizer with a chat template. `placeholder_id` fills audio spans (any valid id: the
    model overwrites those positions with audio embeddings)."""

    def __init__(self, tokenizer, *, placeholder_id: int | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; use an instruct model's tokenizer directory")
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DataError("the tokenizer defines no eos_token; the loss mask needs the end-of-turn token")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_id
        self.placeholder_id = placeholder_id if placeholder_id is not None else self.pad_id
        self._piece_cache: dict[str, np.ndarray] = {}
        self._prompt_cache: dict[tuple, str] = {}

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)

    def _render_prompt(self, messages) -> str:
        """`_render(messages, generation_prompt=True)`, through a bounded cache when every message is just a
        role and a content string (system prompts and instructions repeat across samples)."""
        if not all(len(m) == 2 and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                   for m in messages):
            return self._render(messages, generation_prompt=True)
        key = tuple((m["role"], m["content"]) for m in messages)
        text = self._prompt_cache.get(key)
        if text is None:
            if len(self._prompt_cache) >= _PIECE_CACHE_SIZE:
                self._prompt_cache.clear()
            text = self._prompt_cache[key] = self._render(messages, generation_prompt=True)
        return text

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added), straight from the fast tokenizer's backend
        (transformers' per-call wrapper costs more than the tokenization of these short pieces)."""
        if not texts:
            return []
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None:   # a slow (python) tokenizer
            return [self.tok.encode(t, add_special_tokens=False) for t in texts]
        return [backend.encode(t, add_special_tokens=False).ids for t in texts]

    def text_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids `[n]` int32 of each text alone (no special tokens added), e.g. a clip's transcript."""
        return [np.asarray(ids, np.int32) for ids in self._encode_batch(list(texts))]

    def _encode_prompt_pieces(self, texts: list[str]) -> list[np.ndarray]:
        """`_encode_batch` of prompt pieces (the text between audio spans and answers) as int32 arrays,
        through a bounded cache: system prompts, chat-template headers and instructions repeat across
        samples. Pieces are tokenized alone either way, so a cached piece has the same ids."""
        cache = self._piece_cache
        found = {t: cache.get(t) for t in texts}
        missing = [t for t, ids in found.items() if ids is None]
        if missing:
            if len(cache) + len(missing) > _PIECE_CACHE_SIZE:
                cache.clear()
            for t, ids in zip(missing, self._encode_batch(missing)):
                found[t] = cache[t] = np.asarray(ids, np.int32)
        return [found[t] for t in texts]

    def _split_text(self, text: str, clip_start: int, n_clips: int, segments: list) -> int:
        """Appends ("text", piece) / ("audio", clip) segments for `text`; returns clips consumed."""
        pieces = text.split(AUDIO_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if piece:
                segments.append(("text", piece))
            if i < len(pieces) - 1:
                clip = clip_start + i
                if clip >= n_clips:
                    raise DataError(f"the messages hold more {AUDIO_PLACEHOLDER} placeholders than the "
                                    f"{n_clips} audio clip(s) of the sample")
                segments.append(("audio", clip))
        return len(pieces) - 1

    def encode(self, messages: Sequence[dict], span_lengths: Sequence[int],
               span_suffixes: Sequence[np.ndarray] | None = None) -> TokenizedSample:
        """Tokenizes a conversation; loss on every assistant turn's content + its EOS.

        The conversation is rendered once per assistant turn (prompt, then prompt + answer), cut into
        text / audio / answer segments, and each piece of text is tokenized alone (`_assemble`).
        `span_suffixes[i]` (optional, int32 ids): text tokens placed right after clip i's span."""
        segments: list[tuple[str, Any]] = []
        rendered_upto = ""
        clips = 0
        for k, msg in enumerate(messages):
            if msg.get("role") not in ("system", "user", "assistant"):
                raise DataError(f"message {k} has role {msg.get('role')!r}; expected system, user or assistant")
            if msg["role"] != "assistant":
                continue
            if AUDIO_PLACEHOLDER in msg["content"]:
                raise DataError(f"assistant message {k} holds {AUDIO_PLACEHOLDER}; audio goes in user turns")
            prompt = self._render_prompt(messages[:k])
            full = self._render(messages[:k + 1], generation_prompt=False)
            if not prompt.startswith(rendered_upto) or not full.startswith(prompt):
                raise DataError("the chat template is not prefix-stable; cannot place the loss mask")
            clips += self._split_text(prompt[len(rendered_upto):], clips, len(span_lengths), segments)
            segments.append(("answer", full[len(prompt):]))
            rendered_upto = full
        if not messages or messages[-1].get("role") != "assistant":   # a prompt: end with the generation prompt
            tail = self._render(messages, generation_prompt=True)
            clips += self._split_text(tail[len(rendered_upto):], clips, len(span_lengths), segments)
        if clips != len(span_lengths):
            raise DataError(f"the messages hold {clips} {AUDIO_PLACEHOLDER} placeholder(s) but the sample has "
                            f"{len(span_lengths)} audio clip(s)")
        return self._assemble(segments, span_lengths, span_suffixes)

    def _assemble(self, segments: list[tuple[str, Any]], span_lengths: Sequence[int],
                  span_suffixes: Sequence[np.ndarray] | None = None) -> TokenizedSample:
        """Token arrays of ("text", str) / ("audio", clip) / ("answer", str) segments: each text or answer
        is tokenized alone (text through the piece cache), an audio span is `span_lengths[clip]`
        placeholders numbered 0.. (then `span_suffixes[clip]` as text, when given), and the loss covers each
        answer up to and with its EOS."""
        prompts = iter(self._encode_prompt_pieces([v for kind, v in segments if kind == "text"]))
        answers = iter(self._encode_batch([v for kind, v in segments if kind == "answer"]))
        parts, clips, learned = [], [], []   # per segment: ids, clip index (-1: text), tokens learned (answers)
        for kind, v in segments:
            if kind == "audio":
                parts.append(np.full((int(span_lengths[v]),), self.placeholder_id, np.int32))
                clips.append(v)
                learned.append(0)
                if span_suffixes is not None:
                    parts.append(span_suffixes[v])
                    clips.append(-1)
                    learned.append(0)
            elif kind == "text":
                parts.append(next(prompts))
                clips.append(-1)
                learned.append(0)
            else:
                answer = next(answers)
                if self.eos_id not in answer:
                    raise DataError(f"an assistant turn does not end with the EOS token {self.tok.eos_token!r}")
                parts.append(np.asarray(answer, np.int32))
                clips.append(-1)
                learned.append(answer.index(self.eos_id) + 1)
        lengths = np.asarray([len(p) for p in parts], np.int64)
        starts = np.cumsum(lengths) - lengths
        ids = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
        audio_clip = np.repeat(np.asarray(clips, np.int32), lengths)
        offset = np.arange(len(ids), dtype=np.int32) - np.repeat(starts, lengths).astype(np.int32)
        audio_pos = np.where(audio_clip >= 0, offset, np.int32(-1))
        loss_mask = (offset < np.repeat(np.asarray(learned, np.int32), lengths)).astype(np.float32)
        return TokenizedSample(ids=ids, loss_mask=loss_mask, audio_clip=audio_clip, audio_pos=audio_pos)
