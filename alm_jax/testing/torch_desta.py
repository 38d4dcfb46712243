"""PyTorch reference of the DeSTA2.5 Q-Former connector (`QformerConnector`) and of the splice that writes its
tokens and each clip's transcript tokens into the LLM input, written from their description; the torch side of
`tests/test_connectors.py`, `tests/test_desta_transcripts.py` and `benchmarks/bench_train_step.py`.

    connector = DestaConnector(n_taps=2, n_queries=64, hidden=384, heads=6, intermediate=1536, layers=2,
                               llm_dim=576)
    tokens = connector([h_a, h_b])     # n_taps x [batch, frames, hidden] -> [batch, n_queries, llm_dim]

Per tap, the tap's learned queries `layer_prompts[i]` [1, n_queries, hidden] (broadcast over the batch) go
through one shared `BertEncoder` (decoder layers with cross-attention to that tap's [batch, frames, hidden];
eager attention, no mask: the query self-attention is bidirectional, as in DeSTA); the outputs, stacked to
[batch, n_queries, n_taps, hidden], are mixed by a per-query softmax over taps (`layer_weights`
[n_queries, n_taps]) to [batch, n_queries, hidden]; then LayerNorm + Linear(hidden -> llm_dim). The
state_dict keys are DeSTA's (`layer_prompts.{i}`, `layer_weights`, `qformer.layer.{j}.*`, `proj.0.*`,
`proj.1.*`): `alm_jax.models.connectors.load_bert_qformer_weights` reads them directly.

The splice (DeSTA2.5-Audio `modeling_desta25.py`: `_prepare_audio_context_and_start_positions` and
`DeSTA25AudioModel._prepare_inputs_for_llm`; the dataset's transcript cut in `simple_dataset.py`):

    ids, starts = desta_layout(context_ids, locator_id, [64] * n, [len(t) for t in transcripts], placeholder_id)
    embeds = desta_splice(embed_tokens, input_ids, audio_tokens, transcripts, [(row, start), ...])

each audio locator token becomes `audio_size + transcript_size` placeholder tokens; in the embeddings the
placeholders take the clip's audio tokens, then the LLM embeddings of its transcript ids
(`desta_transcript_ids`: the text cut to its first 100 tokens).
"""

from __future__ import annotations

import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEncoder


def bert_qformer(hidden: int, heads: int, intermediate: int, layers: int, *, attn_implementation: str = "eager",
                 layernorm_noise: float = 0.0) -> BertEncoder:
    """A `BertEncoder` Q-Former stack (decoder layers with cross-attention, no dropout), in training mode.
    `layernorm_noise` > 0 adds `layernorm_noise * randn` to every LayerNorm parameter (non-trivial affine
    params, so a swapped scale/bias would show in a parity test)."""
    enc = BertEncoder(BertConfig(
        hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate, num_hidden_layers=layers,
        is_decoder=True, add_cross_attention=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=attn_implementation))
    if layernorm_noise:
        with torch.no_grad():
            for name, p in enc.named_parameters():
                if "LayerNorm" in name:
                    p.add_(layernorm_noise * torch.randn_like(p))
    return enc


class DestaConnector(torch.nn.Module):
    """DeSTA2.5 `QformerConnector` forward: `forward(taps)` with `taps` a list of `n_taps` tensors
    [batch, frames, hidden] -> [batch, n_queries, llm_dim] (see the module docstring).

    Initialization, in this order from torch's global RNG: `layer_prompts` randn; `layer_weights` randn
    (`random_layer_weights`) or zeros (a plain mean over taps); the Q-Former (`bert_qformer`, with
    `layernorm_noise`); `proj` (torch defaults)."""

    def __init__(self, *, n_taps: int, n_queries: int, hidden: int, heads: int, intermediate: int, layers: int,
                 llm_dim: int, random_layer_weights: bool = False, layernorm_noise: float = 0.0):
        super().__init__()
        self.layer_prompts = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(1, n_queries, hidden)) for _ in range(n_taps)])
        self.layer_weights = torch.nn.Parameter(
            torch.randn(n_queries, n_taps) if random_layer_weights else torch.zeros(n_queries, n_taps))
        self.qformer = bert_qformer(hidden, heads, intermediate, layers, layernorm_noise=layernorm_noise)
        self.proj = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, llm_dim))

    def forward(self, taps):
        outs = [self.qformer(p.expand(t.shape[0], -1, -1), encoder_hidden_states=t).last_hidden_state
                for p, t in zip(self.layer_prompts, taps)]
        outs = torch.stack(outs, 0).permute(1, 2, 0, 3)                      # b, q, taps, h
        w = torch.softmax(self.layer_weights, dim=-1).unsqueeze(-1)
        return self.proj((outs * w).sum(2))


def desta_transcript_ids(tokenizer, text: str, max_tokens: int = 100) -> list[int]:
    """The transcript ids DeSTA embeds for a clip: its dataset cuts `text` to its first `max_tokens` tokens
    (tokenize, slice, back to a string), its collator encodes that string without special tokens."""
    cut = tokenizer.convert_tokens_to_string(tokenizer.tokenize(text, add_special_tokens=False)[:max_tokens])
    return list(tokenizer.encode(cut, add_special_tokens=False))


def desta_layout(token_ids, locator_id: int, audio_sizes, transcript_sizes, placeholder_id: int):
    """DeSTA's `_prepare_audio_context_and_start_positions` on token ids: each `locator_id` becomes
    `audio_sizes[k] + transcript_sizes[k]` copies of `placeholder_id` (k counts the locators). Returns (ids,
    start of each clip's run)."""
    if len(audio_sizes) != len(transcript_sizes):
        raise ValueError(f"{len(audio_sizes)} audio sizes but {len(transcript_sizes)} transcript sizes")
    audio_sizes, transcript_sizes = list(audio_sizes), list(transcript_sizes)
    out, starts = [], []
    for t in token_ids:
        if t == locator_id:
            starts.append(len(out))
            out.extend([placeholder_id] * (audio_sizes.pop(0) + transcript_sizes.pop(0)))
        else:
            out.append(int(t))
    return out, starts


def desta_splice(embed_tokens: torch.nn.Module, input_ids: torch.Tensor, audio_tokens: torch.Tensor,
                 transcript_ids, start_positions) -> torch.Tensor:
    """DeSTA's `_prepare_inputs_for_llm` after the connector: `embed_tokens(input_ids)` `[B, T, d]` with, for
    clip n at `start_positions[n] = (row, start)`, positions `start ..` replaced by `audio_tokens[n]`
    `[M, d]` followed by `embed_tokens(transcript_ids[n])`."""
    embeds = embed_tokens(input_ids).clone()
    for n, (row, start) in enumerate(start_positions):
        ids = torch.as_tensor(transcript_ids[n], dtype=torch.long)
        span = torch.cat([audio_tokens[n], embed_tokens(ids)], dim=0)
        embeds[row, start:start + span.shape[0]] = span
    return embeds
