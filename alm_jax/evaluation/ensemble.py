"""ALARM-E: the inference-time ensemble of ALARM (Grinberg & Shahmohammadi, arXiv 2603.09556).

Several trained ALMs that share one frozen LLM (published: ALARM-CA, then AL-Whisper-Instruct-R) each turn the
same clip into their own audio tokens; the prompt holds one audio span per member, in member order, between
text separators, and the shared LLM answers from the whole. Nothing is trained jointly.

Followed: `Blinorot/ALARM` at commit 67c6776ba152ae130fe1ddd2dd355e863dae3b73, `generate_vllm.py`
(`get_response`, the branch where `feature_extractor` is a list; `generate_vllm_mcqa.py` has the same branch) with
`src/model/llm_audio_wrapper.py` (`prepare_multimodal_inputs`) and `src/model/wrapped_llms/qwen3.py`. For N
members and member i = 1..N, member i's part of the prompt is embedded by member i alone and the parts are
concatenated in time:

    member 1:  [system turn][user header][INTRO(N)][SEP(1, N)] <start_emb_1 audio_1 end_emb_1> ["\\n"]
    member i:  [SEP(i, N)] <start_emb_i audio_i end_emb_i> ["\\n"]
    member N:  ... ["\\n"][the rest of the user turn: the question, end of turn, assistant header]

    INTRO(N)  = "You will hear the same audio {N} times and perceive different aspects of it, e.g., content
                description, environment description, speech transcription, sound quality, etc.. Depending on
                the audio the aspects may differ.Process all of the information to make a decision.\\n\\n"
                (one line in the source; "etc.. " and "differ.Process" are as written there)
    SEP(i, N) = "This is what you hear in the audio for the ({i}/{N}) time:\\n"

Each bracketed text piece is tokenized alone, as ALARM does (a GPT-2-style tokenizer splits "\\n\\nThis" otherwise
than "\\n\\n" + "This"); only the system turn and the user header are one piece here, as in this repository's
single-model prompts (they meet at the template's special tokens).
Each member's learned start/end boundary embeddings are its own: here they are the first and last rows of
each member's span (the ALARM connectors' `AudioBoundary`).

In this repository a member's audio unit is the clip as its prompts place it: `<start_audio><audio><end_audio>`
(text tags around the span, `recipes.base.training_audio`) or a bare `<audio>`. Every member's copy keeps the
tags, glued to the text next to it as in the single-model prompts: `SEP(i, N) + "<start_audio>"` before the span,
`"<end_audio>" + "\\n"` after it. Text before the unit in the user turn (none in ALARM's prompts, whose audio opens
the user turn) stays before INTRO; the text after it is the rest.

Shapes (B prompts, N members, S audio samples, T tokens, d = the LLM width):

    prompt batch (`EnsembleAnswerer`, left-padded as `data.pipeline.collate_prompts`):
      input_ids / attention_mask / audio_clip / audio_pos `[B, T]`; audio_clip = the member (0..N-1) whose
      token sits there, audio_pos = the token index in that member's span (its `num_audio_tokens(n)` long)
      audio `[B * N, S]`: row b * N + i = prompt b's clip, for member i; audio_samples `[B * N]`
    `AlarmEnsemble.embed_inputs`: member i's `audio_tokens` `[B, M_i, d]`, zero-padded to M = max M_i and
      interleaved to `[B * N, M, d]` -> spliced into the shared LLM's text embeddings -> `[B, T, d]`
    answers (`models.alm.generate`, or beam search per `eval.decoding`): `[B, max_new_tokens]`

    ensemble = AlarmEnsemble([run_ca.model, run_r.model])                # one frozen LLM (checked), N >= 2
    answerer = EnsembleAnswerer([run_ca.cfg, run_r.cfg], batch_size=8, max_new_tokens=64)
    texts = answerer.alm(ensemble, records)                               # records with one clip each
    suite = ensemble_suite([run_ca.cfg, run_r.cfg], suite_cfg)            # mmau / mmsu / mmar; suite.run(ensemble)
    (`alm eval CKPT_CA CKPT_R --ensemble alarm_e --suite mmsu --data mmsu.jsonl`)

One member is refused (N >= 2): ALARM's single-model path has no separators, so N = 1 is not the plain model
("You will hear the same audio 1 times"); evaluate the checkpoint alone instead.

Differences from ALARM: answers are decoded as the run's `eval.decoding` says (greedy by default, as every
answer here); ALARM samples with the LLM's default generation settings in vLLM under a thinking budget
(`max_thinking_tokens`, then its "Considering the limited time..." continuation). The text is embedded once by
the shared LLM (ALARM: by each member's copy of the same frozen table). A prompt without audio is answered
from its own text (no separators); a prompt with several clips is refused.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.config import SuiteConfig, TrainConfig
from alm_jax.data.pipeline import AudioSpec, SampleBuilder
from alm_jax.data.records import AUDIO_PLACEHOLDER, Record
from alm_jax.errors import ConfigError
from alm_jax.evaluation.answering import Answer, Answerer, Progress
from alm_jax.evaluation.benchmarks import MMARSuite, MMAUSuite, MMSUSuite, MultipleChoiceSuite
from alm_jax.models.alm import AudioLanguageModel, splice_audio
from alm_jax.models.connectors import connector_token_rule
from alm_jax.recipes.base import END_AUDIO_TAG, START_AUDIO_TAG

ENSEMBLE_SUITES = {"mmau": MMAUSuite, "mmsu": MMSUSuite, "mmar": MMARSuite}   # suites answered through `alm` only
MEMBER_END = "\n"   # after each member's audio (ALARM's per-member `inputs_main`)


def ensemble_intro(n: int) -> str:
    """ALARM-E's opening text for `n` members (`generate_vllm.py`, `extra_input_str`)."""
    return (f"You will hear the same audio {n} times and perceive "
            "different aspects of it, e.g., content description, environment description, "
            "speech transcription, sound quality, etc.. "
            "Depending on the audio the aspects may differ."
            "Process all of the information to make a decision.\n\n")


def member_header(i: int, n: int) -> str:
    """The separator before member `i`'s audio (1-based, of `n`; `generate_vllm.py`, `input_start_str`)."""
    return f"This is what you hear in the audio for the ({i}/{n}) time:\n"


def _too_few(n: int) -> ConfigError:
    return ConfigError(f"ALARM-E joins at least two trained models (ALARM: ALARM-CA, then AL-Whisper-Instruct-R); "
                       f"got {n}. A single checkpoint is evaluated alone: `alm eval CKPT --suite ...` without "
                       "--ensemble")


class AlarmEnsemble(nnx.Module):
    """N >= 2 ALMs over one frozen LLM, seen by the answering code as one model (`embed_inputs`, `llm`).

    The members must share the LLM: the same architecture, dtype and weights (compared here, parameter by
    parameter) and no LoRA. Then `members[1:]` are given `members[0]`'s LLM object, so one copy is held and
    traced, and every member is put in eval mode (BatchNorm on running statistics, no dropout): ALARM-E is
    inference. `members` are in prompt order (ALARM-E: ALARM-CA, then AL-Whisper-Instruct-R)."""

    def __init__(self, members: Sequence[AudioLanguageModel]):
        members = list(members)
        if len(members) < 2:
            raise _too_few(len(members))
        first = members[0]
        for k, m in enumerate(members):
            if nnx.to_flat_state(nnx.state(m.llm, nnx.LoRAParam)):
                raise ConfigError(f"ensemble member {k} has LoRA adapters on its LLM; ALARM-E feeds every member's "
                                  "audio tokens to one frozen LLM, so its members must be trained without LoRA "
                                  "(model.lora.rank=0)")
            if k and m.llm is not first.llm:
                _check_same_llm(first.llm, m.llm, k)
        for m in members[1:]:
            m.llm = first.llm
        for m in members:
            m.eval()
        self.members = nnx.List(members)
        self.llm = first.llm

    @property
    def token_rules(self) -> tuple:
        """Each member's clip-length -> span-length rule (its connector's `TokenRule`)."""
        return tuple(m.token_rule for m in self.members)

    def embed_inputs(self, batch: dict[str, jax.Array]) -> jax.Array:
        """An `EnsembleAnswerer` prompt batch -> `[B, T, d]`: the shared LLM's text embeddings with member i's
        audio tokens of row b's clip (`audio[b * N + i]`) where `audio_clip == i` (module docstring)."""
        text = self.llm.embed(batch["input_ids"])
        if "audio_features" in batch:
            raise ConfigError("an ALARM-E batch holds waveforms (each member computes its own features); build "
                              "it with EnsembleAnswerer, not with data.host_features")
        if "audio" not in batch:
            return text
        b, n = text.shape[0], len(self.members)
        if batch["audio"].shape[0] != b * n:
            raise ConfigError(f"the batch holds {batch['audio'].shape[0]} clip slots for {b} prompts; an ALARM-E batch "
                              f"has one per member ({n}) and prompt: build it with EnsembleAnswerer")
        audio = batch["audio"].reshape(b, n, -1)
        samples = batch["audio_samples"].reshape(b, n)
        tokens = [m.audio_tokens(audio[:, i], samples[:, i]).astype(text.dtype) for i, m in enumerate(self.members)]
        width = max(t.shape[1] for t in tokens)
        tokens = [jnp.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tokens]
        stacked = jnp.stack(tokens, axis=1).reshape(b * n, width, text.shape[-1])   # row b * N + i: member i
        return splice_audio(text, stacked, batch["audio_clip"], batch["audio_pos"])


def _check_same_llm(first, other, k: int) -> None:
    """ConfigError unless `other` (member k's LLM) has `first`'s config, dtype and weights."""
    if other.cfg != first.cfg or other.dtype != first.dtype:
        raise ConfigError(f"ensemble member {k} has another LLM than member 0 ({other.cfg}, dtype {other.dtype} vs "
                          f"{first.cfg}, dtype {first.dtype}); ALARM-E feeds one frozen LLM: use models trained on "
                          "the same model.llm and model.dtype")
    a, b = nnx.to_flat_state(nnx.state(first, nnx.Param)), nnx.to_flat_state(nnx.state(other, nnx.Param))
    same = len(a) == len(b) and all(
        pa == pb and va[...].shape == vb[...].shape and va[...].dtype == vb[...].dtype
        and bool(jnp.array_equal(va[...], vb[...])) for (pa, va), (pb, vb) in zip(a, b))
    if not same:
        raise ConfigError(f"ensemble member {k}'s LLM weights differ from member 0's; ALARM-E feeds one frozen LLM: "
                          "use models trained on the same model.llm")


class _EnsemblePrompts(SampleBuilder):
    """`base`'s tokenizer and audio buffer; `build_prompt` writes ALARM-E's prompt (module docstring): a record's
    one clip becomes N slots (slot i for member i, whose span is `rules[i]` tokens long). Waveforms only."""

    def __init__(self, base: SampleBuilder, rules: Sequence):
        super().__init__(base.tok, base.audio, base.seq_len, len(rules))
        self.rules = tuple(rules)

    def build_prompt(self, record: Record) -> dict[str, Any]:
        if not record.clips:
            return super().build_prompt(record)   # no audio: the prompt's own text
        n = len(self.rules)
        if len(record.clips) > 1:
            raise ConfigError(f"ALARM-E answers about one clip; a prompt holds {len(record.clips)} clips (multi-audio "
                              "suites are not ensembled: evaluate each checkpoint alone)")
        audio, n_valid, _ = self._audio(record)                       # the clip in slot 0 ...
        audio, n_valid = np.tile(audio, n), np.full_like(n_valid, n_valid[0])   # ... and in every member's slot
        rendered = self.tok.tok.apply_chat_template(list(record.messages), tokenize=False, add_generation_prompt=True)
        if rendered.count(AUDIO_PLACEHOLDER) != 1:
            raise ConfigError(f"the prompt holds {rendered.count(AUDIO_PLACEHOLDER)} {AUDIO_PLACEHOLDER} placeholders "
                              "for its one clip; ALARM-E replaces exactly one")
        before, after = rendered.split(AUDIO_PLACEHOLDER)
        tagged = before.endswith(START_AUDIO_TAG) and after.startswith(END_AUDIO_TAG)
        left, right = (START_AUDIO_TAG, END_AUDIO_TAG) if tagged else ("", "")
        before, after = before[:len(before) - len(left)], after[len(right):]
        segments = [before, ensemble_intro(n)]   # text pieces (each tokenized alone) and member spans
        for i in range(n):
            segments += [member_header(i + 1, n) + left, i, right + MEMBER_END]
        segments.append(after)
        texts = iter(self.tok.text_ids([s for s in segments if isinstance(s, str)]))
        ids, clip, pos = [], [], []
        for s in segments:
            if isinstance(s, str):
                piece = next(texts)
                ids.append(piece)
                clip.append(np.full((len(piece),), -1, np.int32))
                pos.append(clip[-1])
            else:
                span = int(self.rules[s](int(n_valid[s])))
                ids.append(np.full((span,), self.tok.placeholder_id, np.int32))
                clip.append(np.full((span,), s, np.int32))
                pos.append(np.arange(span, dtype=np.int32))
        return {"ids": np.concatenate(ids), "clip": np.concatenate(clip), "pos": np.concatenate(pos),
                self.audio_key: audio, "audio_samples": n_valid}


def check_members(cfgs: Sequence[TrainConfig]) -> None:
    """ConfigError unless the runs `cfgs` can form ALARM-E: two or more, one LLM directory, no LoRA, answers
    from audio tokens alone (no DeSTA transcripts, no MATS Santa), one audio buffer."""
    if len(cfgs) < 2:
        raise _too_few(len(cfgs))
    llms = [os.path.realpath(c.model.llm) if os.path.exists(c.model.llm) else c.model.llm for c in cfgs]
    for k, c in enumerate(cfgs):
        if llms[k] != llms[0]:
            raise ConfigError(f"ensemble member {k} was trained on model.llm={c.model.llm}, member 0 on "
                              f"{cfgs[0].model.llm}; ALARM-E feeds every member's audio tokens to one frozen LLM: "
                              "join checkpoints trained on the same LLM")
        if c.model.lora.rank > 0:
            raise ConfigError(f"ensemble member {k} has LoRA on its LLM (model.lora.rank={c.model.lora.rank}); "
                              "ALARM-E feeds one frozen LLM, so its members are trained without LoRA")
        if c.model.connector.transcript_tokens > 0 or c.model.connector.kind == "mats":
            raise ConfigError(f"ensemble member {k} ({c.model.connector.kind}) answers with more than its audio "
                              "tokens (DeSTA transcripts / MATS Santa memory); ALARM-E joins audio-token models "
                              "such as the alarm, alarm_ca, alarm_p and sum connectors")
    specs = [AudioSpec.from_config(c) for c in cfgs]
    if len({spec.buffer_samples for spec in specs}) > 1:
        seconds = [spec.buffer_samples / spec.sample_rate for spec in specs]
        raise ConfigError(f"the ensemble members hold clips of different lengths ({seconds} s: "
                          "data.max_audio_seconds, or model.encoders.0.pad_to_seconds); every member hears the "
                          "same clip: give them one length, e.g. --set data.max_audio_seconds=30")


class EnsembleAnswerer(Answerer):
    """`Answerer` for an `AlarmEnsemble` of the runs `cfgs` (in member order): ALARM-E prompts, each member's
    span as long as its connector says, the tokenizer and audio buffer of member 0 (the same for all, checked).
    Decoding as `cfgs[0].eval.decoding`."""

    def __init__(self, cfgs: Sequence[TrainConfig], *, batch_size: int = 8, max_new_tokens: int = 64,
                 length_bucket: int = 64):
        check_members(cfgs)
        super().__init__(cfgs[0], batch_size=batch_size, max_new_tokens=max_new_tokens, length_bucket=length_bucket)
        self.rules = tuple(connector_token_rule(c.model.connector, c.model.encoders) for c in cfgs)
        self.builder = _EnsemblePrompts(self.builder, self.rules)

    def alm_answers(self, model, records: Sequence[Record], progress: Progress | None = None) -> list[Answer]:
        if not isinstance(model, AlarmEnsemble):
            raise ConfigError(f"EnsembleAnswerer answers with an AlarmEnsemble of its runs' models, got "
                              f"{type(model).__name__}")
        if model.token_rules != self.rules:
            raise ConfigError(f"the ensemble's {len(model.members)} members do not match the {len(self.rules)} run "
                              "configs of the answerer (connector token rules differ); give both in the same order")
        return super().alm_answers(model, records, progress)


def ensemble_suite(cfgs: Sequence[TrainConfig], suite: SuiteConfig) -> MultipleChoiceSuite:
    """The multiple-choice suite `suite` (mmau, mmsu, mmar) built from member 0's run, answering through an
    `EnsembleAnswerer` of `cfgs`: `ensemble_suite(cfgs, suite).run(AlarmEnsemble(models))`."""
    if suite.name not in ENSEMBLE_SUITES:
        raise ConfigError(f"suite {suite.name!r} cannot run an ensemble; ALARM-E answers the multiple-choice "
                          f"suites {sorted(ENSEMBLE_SUITES)}")
    check_members(cfgs)
    ev = ENSEMBLE_SUITES[suite.name].build(cfgs[0], suite)
    ev.answerer = EnsembleAnswerer(cfgs, batch_size=suite.batch_size, max_new_tokens=suite.max_new_tokens)
    return ev
