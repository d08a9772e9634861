"""The "fast" rollout engine's decoder: plain tensors, fused projections, a static KV cache.

Sampling a small model at a small batch with Hugging Face ``generate`` spends its decode step
on matmuls that read every weight from memory, on three extra ops per LoRA-adapted linear, on
SDPA's kernel for a single query, on a KV cache that grows by concatenation, and on Python
dispatch through every module (bench/RESULTS.md, section 6, measures each). This module decodes
with plain tensors instead:

- before every rollout (`FusedDecoder.refresh`: the adapter changes every optimizer step) the
  LoRA adapter is merged into *new* weight tensors, ``W + s B A`` (the model is never written
  to, so the frozen teacher cannot drift), and q, k, v become one matmul (their weights
  concatenated), and so do gate and up: one merge per rollout instead of a LoRA side path in
  every decode step;
- on CPU in float32 the merged weights are prepacked for oneDNN (as inductor's CPU freezing
  does), which at decode sizes runs faster than ``F.linear`` (bench/RESULTS.md, section 6);
- the KV cache is allocated once per batch, at its final size, and written in place;
- the final norm and the output head run on the last position only, and the one new query of a
  decode step attends with plain matmuls;
- sampling draws one uniform per row (`draw`) instead of one exponential per vocabulary entry;
- rows that stopped leave the batch (`COMPACT_AT`), so a decode step runs only the rows still
  sampling.

Norms, rotary embeddings and embeddings are the model's own modules, so the numbers are the
student's up to the order of floating-point sums (bench/rollout.py measures greedy agreement
and log-probabilities against the student's own forward). The model is never written to.
Supported: decoder-only Llama-layout models (Llama, SmolLM2, Qwen2, Qwen3, Mistral without a
sliding window) with plain LoRA (no DoRA, no LoRA bias) or none; `FusedDecoder.unsupported`
says why another model is not, and `rollout.FastEngine` then falls back to ``generate`` with
the adapter merged.

Sampling follows ``transformers``' order: temperature, then top-k, then top-p, then a draw from
the softmax (`process_scores`); greedy is the argmax of the raw logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opsd_kit.models import plain_attention_error

COMPACT_AT = 0.25
"""`FusedDecoder.decode` drops the rows that stopped from the batch (their KV caches, masks and
positions, by ``index_select``) once they are at least this fraction of the rows it still
decodes. A compaction copies the kept rows' caches of every layer (at their allocated length),
about the memory traffic of one decode step's attention, and every later step then skips the
dropped rows' projections, attention and head; compacting at every stop would pay that copy
once per stopped row, each time to save one row's work. With a quarter, at most a quarter of a
step's rows are stopped ones, and each compaction drops at least a quarter of the rows (so a
batch of B compacts at most about log(B) / log(4/3) times). 0 compacts at every stop; above 1,
never (every row decodes until all have stopped)."""


class _Projection:
    """Linears that read the same input, as one: ``x -> cat_i((W_i + sum_a s_a B_ia A_ia) x + b_i)``.

    `refresh` builds the merged weight from the modules' current tensors: the base weights
    concatenated into a new tensor, plus every active LoRA adapter's delta ``s B A`` (computed
    in the adapters' dtype and cast to the base dtype, as peft's ``merge`` does), then on CPU in
    float32 prepacks it for oneDNN. Nothing is cached between refreshes, so no change of the
    model (an optimizer step, an adapter switched off, a loaded state dict) can go unseen; a
    single linear without an adapter (the head) is used as it is unless it is prepacked."""

    def __init__(self, modules: list, rows_hint: int):
        self.modules, self.rows_hint = modules, rows_hint

    def refresh(self) -> None:
        bases = [_base_layer(m) for m in self.modules]
        blocks, row = [], 0  # (first output row, A [r, in], s * B [out_i, r]) per module and adapter
        for m, base in zip(self.modules, bases):
            if hasattr(m, "lora_A") and not m.disable_adapters:
                blocks += [(row, m.lora_A[a].weight.detach(), m.lora_B[a].weight.detach() * m.scaling[a])
                           for a in m.active_adapters if a in m.lora_A]
            row += base.weight.shape[0]
        if len(bases) == 1 and not blocks:
            weight = bases[0].weight.detach()  # no copy: read as it is, or prepacked into a new tensor
        else:
            weight = torch.cat([b.weight.detach() for b in bases])  # a new tensor, also for one module
        for first, a, sb in blocks:
            rows = weight[first:first + sb.shape[0]]
            if a.dtype == weight.dtype:
                rows.addmm_(sb, a)  # W + s B A in one pass
            else:  # e.g. a bfloat16 base with float32 adapters: the delta in the adapters' dtype, as peft merges
                rows += (sb @ a).to(weight.dtype)
        biases = [b.bias for b in bases]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach() if b is not None else weight.new_zeros(base.weight.shape[0])
                                   for b, base in zip(biases, bases)])
        self.weight, self.packed = weight, None
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            try:
                self.packed, self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, self.rows_hint), None
            except (AttributeError, RuntimeError):  # a torch build without these ops: F.linear
                self.packed = None

    def release(self) -> None:
        """Drop the merged tensors (`refresh` builds them again)."""
        self.weight = self.packed = self.bias = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@dataclass
class _Layer:
    """One decoder layer: its fused projections and the model's own norm modules."""

    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    qkv: _Projection  # H -> (nh + 2 * nkv) * hd
    o: _Projection  # nh * hd -> H
    gate_up: _Projection  # H -> 2 * I
    down: _Projection  # I -> H


class FusedDecoder:
    """A (LoRA) causal LM's decoder for sampling, without modules: fused projections and a
    static KV cache.

    Building one merges the current adapter; call `refresh` before each later rollout (it merges
    the adapter as it is then into a new copy of the projections; memory: one copy of the
    decoder's projection weights), then `decode` each batch, then `release` the copy (so that
    it is not held while the trainer computes the loss). It holds no gradients and never writes
    to the model. ``rows_hint`` is the batch size the CPU packing is tuned for.
    """

    def __init__(self, model, rows_hint: int = 8):
        reason = self.unsupported(model)
        if reason:
            raise ValueError(f"FusedDecoder: {reason}")
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # Qwen2/3 and Mistral's too

        self.model = model
        causal_lm = _causal_lm(model)
        cfg = causal_lm.config
        self.backbone = causal_lm.get_decoder()
        self.embed = causal_lm.get_input_embeddings()
        self.dtype = self.embed.weight.dtype
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._rotate = apply_rotary_pos_emb
        self.layers = [_Layer(input_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm,
                              q_norm=getattr(layer.self_attn, "q_norm", None),
                              k_norm=getattr(layer.self_attn, "k_norm", None),
                              qkv=_Projection([layer.self_attn.q_proj, layer.self_attn.k_proj,
                                               layer.self_attn.v_proj], rows_hint),
                              o=_Projection([layer.self_attn.o_proj], rows_hint),
                              gate_up=_Projection([layer.mlp.gate_proj, layer.mlp.up_proj], rows_hint),
                              down=_Projection([layer.mlp.down_proj], rows_hint))
                       for layer in self.backbone.layers]
        self.head = _Projection([causal_lm.get_output_embeddings()], rows_hint)
        self.refresh()

    def _projections(self) -> list[_Projection]:
        return [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.head]

    @torch.no_grad()
    def refresh(self) -> None:
        """Merge the model's current weights (adapter and base) into new projection tensors."""
        reason = self.unsupported(self.model)
        if reason:  # e.g. an adapter merged into the base since the decoder was built
            raise ValueError(f"FusedDecoder: {reason}")
        for projection in self._projections():
            projection.refresh()

    def release(self) -> None:
        """Free the merged copy of the projections until the next `refresh`."""
        for projection in self._projections():
            projection.release()

    @staticmethod
    def unsupported(model) -> str | None:
        """Why `FusedDecoder` cannot decode ``model`` as the student, or None when it can."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        causal_lm = _causal_lm(model)
        cfg = causal_lm.config
        error = plain_attention_error(cfg)
        if error:
            return error
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"hidden_act {cfg.hidden_act!r} (only 'silu')"
        if getattr(cfg, "mlp_bias", False):
            return "MLP biases"
        if getattr(causal_lm, "is_loaded_in_4bit", False) or getattr(causal_lm, "is_loaded_in_8bit", False):
            return "a quantized base"
        head, embed = causal_lm.get_output_embeddings(), causal_lm.get_input_embeddings()
        for name, m in model.named_modules():
            if isinstance(m, BaseTunerLayer) and type(m) is not LoraLinear:
                return f"{name}: a {type(m).__name__} adapter layer, not a plain LoRA Linear"
            if isinstance(m, LoraLayer):
                if getattr(m, "merged", False):
                    return f"{name} holds a merged adapter"
                if m is head or m is embed:
                    return f"{name}: LoRA on the embeddings or the head"
                if getattr(m, "fan_in_fan_out", False) or not isinstance(_base_layer(m), torch.nn.Linear):
                    return f"{name}: LoRA on a layer that is not a plain nn.Linear"
                adapters = [a for a in m.active_adapters if a in m.lora_A]
                if any(a in getattr(m, "lora_variant", {}) or m.lora_bias.get(a, False) for a in adapters):
                    return f"{name} uses a LoRA variant (DoRA) or a LoRA bias"
        return None

    # -- decoding -----------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, *, max_new_tokens: int,
               eos_ids: list[int], pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               min_new_tokens: int = 0, logprobs: bool = False, prefill=None):
        """Sample (``temperature > 0``) or greedily decode up to ``max_new_tokens`` per row of a
        left-padded batch. Rows that stopped are filled with ``pad_id`` (as ``generate`` does)
        and leave the work (`COMPACT_AT`); decoding ends when every row has stopped. A seed gives
        the same tokens whichever rows left: each step draws one uniform per row of the batch.
        ``min_new_tokens`` bans the stop tokens before that many tokens (``generate``'s
        ``min_new_tokens``; for fixed-length benchmarks).

        ``prefill`` (a `rollout.Prefill` in this batch's layout): the prompt's key/value states and
        next-token logits from the caller's own pass (the trainer's student forward), used instead
        of running the prompt through the merged weights here.

        Returns ``(new_ids_BN, logprobs_BN)``: the generated ids and, with ``logprobs=True``,
        each one's log-probability under the processed distribution it was drawn from, 0 after
        the row's stop token (None with ``logprobs=False``).
        """
        if max_new_tokens < 1:
            raise ValueError(f"decode needs max_new_tokens >= 1, got {max_new_tokens}")
        if self.head.weight is None and self.head.packed is None:
            raise RuntimeError("FusedDecoder.decode after release(): call refresh() first")
        B, L = input_ids_BL.shape
        device = input_ids_BL.device
        total = L + max_new_tokens
        valid_BK = torch.zeros(B, total, dtype=torch.bool, device=device)  # keys a query may attend to
        valid_BK[:, :L] = attention_mask_BL.bool()
        cache = [(self._empty_cache(B, total, device), self._empty_cache(B, total, device)) for _ in self.layers]
        # positions as generate computes them for left padding: 0 at each row's first real token
        position_BL = (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)
        if prefill is None:
            causal_LL = torch.ones(L, L, dtype=torch.bool, device=device).tril()
            # a padding query attends to itself as well, so no row of the mask is empty (no NaN)
            prefill_mask = (causal_LL & valid_BK[:, None, None, :L]) | torch.eye(L, dtype=torch.bool, device=device)
            logits_BV = self._forward(input_ids_BL, position_BL, cache, 0, prefill_mask)
        else:
            if prefill.logits_BV.shape[0] != B or prefill.keys[0].shape[-2] != L:
                raise ValueError(f"prefill for {prefill.logits_BV.shape[0]} rows x {prefill.keys[0].shape[-2]} "
                                 f"columns, but the batch is {B} x {L}")
            for (k_cache, v_cache), k, v in zip(cache, prefill.keys, prefill.values):
                k_cache[:, :, :L], v_cache[:, :, :L] = k, v
            logits_BV = prefill.logits_BV
        position_A1 = position_BL[:, -1:] + 1
        eos_E = torch.tensor(eos_ids, dtype=torch.long, device=device)
        # the A rows still in the work, as indices into the batch (in order); a row that stopped
        # stays in the work, fed pad_id, until the next compaction (`COMPACT_AT`)
        rows_A = torch.arange(B, device=device)
        finished_A = torch.zeros(B, dtype=torch.bool, device=device)
        valid_AK, logits_AV = valid_BK, logits_BV
        new_ids_BN = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs_BN = torch.zeros(B, max_new_tokens, device=device) if logprobs else None
        for t in range(max_new_tokens):
            scores_AV = logits_AV.float()
            if t < min_new_tokens:  # out of place: the first logits may be the caller's (a prefill)
                scores_AV = scores_AV.index_fill(1, eos_E, float("-inf"))
            if temperature > 0:
                scores_AV = process_scores(scores_AV, temperature, top_k, top_p)
                # one uniform per row of the whole batch, as if no row had left: a seed gives the same tokens
                u_B1 = torch.rand(B, 1, device=device, dtype=torch.float64)
                token_A = draw(torch.softmax(scores_AV, -1), u_B1[rows_A])
            else:
                token_A = scores_AV.max(-1).indices  # the first maximal index, as argmax (which is slower on CPU)
            token_A = token_A.masked_fill(finished_A, pad_id)
            new_ids_BN[rows_A, t] = token_A
            if logprobs:
                logprob_A = torch.log_softmax(scores_AV, -1).gather(1, token_A[:, None]).squeeze(1)
                logprobs_BN[rows_A, t] = logprob_A.masked_fill(finished_A, 0.0)
            finished_A |= torch.isin(token_A, eos_E)
            done = int(finished_A.sum())
            if t == max_new_tokens - 1 or done == len(rows_A):
                break
            if done and done >= COMPACT_AT * len(rows_A):
                keep_A = (~finished_A).nonzero().squeeze(1)
                cache = [(k.index_select(0, keep_A), v.index_select(0, keep_A)) for k, v in cache]
                rows_A, finished_A, token_A = rows_A[keep_A], finished_A[keep_A], token_A[keep_A]
                valid_AK, position_A1 = valid_AK[keep_A], position_A1[keep_A]
            valid_AK[:, L + t] = True
            logits_AV = self._forward(token_A[:, None], position_A1, cache, L + t, valid_AK[:, None, None, : L + t + 1])
            position_A1 = position_A1 + 1
        return new_ids_BN[:, : t + 1], (logprobs_BN[:, : t + 1] if logprobs else None)

    def _empty_cache(self, B: int, total: int, device) -> torch.Tensor:
        return torch.empty(B, self.num_kv_heads, total, self.head_dim, dtype=self.dtype, device=device)

    def _forward(self, ids_BQ, position_BQ, cache, start: int, mask_BHQK) -> torch.Tensor:
        """Run ``Q`` new positions (from cache slot ``start`` on) through every layer; returns the
        last position's logits [B, V]."""
        B, Q = ids_BQ.shape
        end = start + Q
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        h_BQH = self.embed(ids_BQ)
        cos, sin = self.backbone.rotary_emb(h_BQH, position_BQ)
        blocked_B11K = ~mask_BHQK if Q == 1 else None
        for layer, (k_cache, v_cache) in zip(self.layers, cache):
            x = layer.input_norm(h_BQH)
            q, k, v = layer.qkv(x).split([nh * hd, nkv * hd, nkv * hd], -1)
            q, k, v = q.view(B, Q, nh, hd), k.view(B, Q, nkv, hd), v.view(B, Q, nkv, hd)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = self._rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v.transpose(1, 2)
            if Q == 1:
                attn = _one_query_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], blocked_B11K)
            else:
                attn = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end],
                                                      attn_mask=mask_BHQK, enable_gqa=nh != nkv)
            h_BQH = h_BQH + layer.o(attn.transpose(1, 2).reshape(B, Q, nh * hd))
            gate, up = layer.gate_up(layer.post_norm(h_BQH)).chunk(2, -1)
            h_BQH = h_BQH + layer.down(F.silu(gate) * up)
        return self.head(self.backbone.norm(h_BQH[:, -1]))


def _one_query_attention(q_BNQD, k_BGKD, v_BGKD, blocked_B11K) -> torch.Tensor:
    """Attention of one new query per row (decode) with plain matmuls, the N query heads in G
    groups sharing a key/value head; ``blocked`` marks the keys a row may not see (padding); the
    softmax in float32 whatever the dtype, as transformers' eager attention does it. At
    these sizes SDPA's CPU kernel costs more than the attention itself (about 10% of a decode
    step in bench/rollout.py)."""
    B, N, _, D = q_BNQD.shape
    G = k_BGKD.shape[1]
    scores = (q_BNQD.view(B, G, N // G, D) @ k_BGKD.transpose(-1, -2)) * D ** -0.5
    weights = scores.masked_fill(blocked_B11K, float("-inf")).softmax(-1, dtype=torch.float32)  # as HF's eager
    return (weights.to(v_BGKD.dtype) @ v_BGKD).view(B, N, 1, D)


def process_scores(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling scores as ``transformers``' warpers make them: divide by ``temperature``, then keep
    the ``top_k`` largest (0: all; ties at the k-th value kept), then the smallest set whose
    probability reaches ``top_p`` (1.0: all; the most likely token always kept). Removed
    tokens get ``-inf``."""
    scores = logits_BV / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


def draw(probs_BV: torch.Tensor, u_B1: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from ``probs_BV`` by inverting the cumulative distribution at a uniform
    draw: ``u_B1`` (float64 in [0, 1)), or else ``torch.rand``'s (so ``torch.manual_seed`` fixes
    it). A token of probability 0 is never drawn: its interval of the cumulative sum is empty.
    The sum runs in float64, so the tail of a 150k-entry vocabulary keeps its intervals (in
    float32 a token of probability under ~3e-8 past the sum's midpoint would round to an empty
    one). One uniform per row instead of ``torch.multinomial``'s exponential per vocabulary
    entry."""
    cdf_BV = probs_BV.double().cumsum(-1)
    if u_B1 is None:
        u_B1 = torch.rand(probs_BV.shape[0], 1, device=probs_BV.device, dtype=cdf_BV.dtype)
    return torch.searchsorted(cdf_BV, u_B1 * cdf_BV[:, -1:], right=True).squeeze(1).clamp_(max=probs_BV.shape[-1] - 1)


def _causal_lm(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_layer(module):
    """The frozen linear under a peft LoRA layer (or the module itself)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module
