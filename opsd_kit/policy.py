"""The trained model and its teacher: one set of weights, two roles.

`Policy` holds the causal LM being trained (usually a base model with a LoRA adapter) and
gives the teacher's computation inside ``with policy.teacher():`` (docs/algorithm.md, Teacher):

- ``"frozen"`` (the paper's setting): the initial model: the base model with the adapter
  switched off, so no second copy of the weights exists (a run from ``init_adapter``: that
  adapter's weights, swapped in, `Policy.start_weights`). It needs LoRA; without it the "frozen" teacher would
  silently be the live model (docs/algorithm.md, Pitfalls, 9), so that combination is refused.
- ``"live"``: the current weights, without gradients.
- ``"ema"``: an exponential moving average of the trainable weights, swapped into the
  trainable parameters for the duration of the context (call `Policy.update_ema` after
  each optimizer step).

The trainer never asks the model for logits: `Policy.backbone_hidden` returns the final
hidden states and the loss is computed in chunks through `Policy.head`.

On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight into an
inference-only layout the first time the layer runs in eval mode without gradients (as a
teacher or a rollout pass does); training through the layer then fails. `Policy` turns
that repacking off on every 4-bit layer.
"""
from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import peft
import torch
from peft import PeftModel

from opsd_kit import models
from opsd_kit.config import BACKENDS, DTYPES, QUANTIZATIONS, TEACHERS, ConfigError, lora_error
from opsd_kit.run.card import write_card

if TYPE_CHECKING:
    from opsd_kit.config import TrainConfig
    from opsd_kit.prompts import Batch


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings; the defaults are the paper's (arXiv 2601.18734)."""

    r: int = 64
    """Rank of the low-rank update."""
    alpha: int = 128
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    """Names of the linear layers that get an adapter (attention and MLP projections)."""

    def to_peft(self) -> peft.LoraConfig:
        """The equivalent `peft.LoraConfig` for a causal LM."""
        return peft.LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
        )

    @classmethod
    def from_peft(cls, config: peft.LoraConfig) -> LoraSettings:
        """Settings read back from a `peft.LoraConfig` (for example a saved adapter's)."""
        return cls(r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   target_modules=tuple(sorted(config.target_modules)))


PAPER_LORA = LoraSettings()


class Policy:
    """A causal LM being trained, plus its teacher (frozen base, live weights or EMA).

    Build one with `Policy.from_pretrained` (loads by name through `opsd_kit.models`) or
    from a model already loaded (tests, custom loading). The model is left in train mode.

    Args:
        model: a transformers causal LM (plain, 4-bit, or already a `peft.PeftModel`).
        tokenizer: its tokenizer.
        lora: settings for a new adapter, or ``None`` for full fine-tuning. Ignored when
            ``model`` is already a `PeftModel`, whose own adapter config is used.
        teacher: ``"frozen"``, ``"live"`` or ``"ema"``.
        ema_decay: decay of the EMA teacher, in (0, 1).
        gradient_checkpointing: recompute activations in the backward pass (non-reentrant).
        seed: seeds the adapter's random initialisation (the global RNG is left untouched).
    """

    def __init__(self, model, tokenizer, *, lora: LoraSettings | None = PAPER_LORA,
                 teacher: str = "frozen", ema_decay: float = 0.999,
                 gradient_checkpointing: bool = False, seed: int = 0):
        _check_choice("teacher", teacher, TEACHERS)
        _check_ema_decay(ema_decay)
        if isinstance(model, PeftModel):
            lora = LoraSettings.from_peft(model.peft_config[model.active_adapter])
        quantized = bool(getattr(model, "is_loaded_in_4bit", False))
        _check_plain_head(model.config)
        _check_lora_needed(lora, teacher, quantized)
        _disable_cpu_repacking(model)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None and not isinstance(model, PeftModel):
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = peft.get_peft_model(model, lora.to_peft())
        model.train()
        self.model = model
        self.tokenizer = tokenizer
        self.lora = lora
        self.teacher_mode = teacher
        self.ema_decay = ema_decay
        self.quantized = quantized
        self.backend = "hf"
        """Whose modules run the model: "hf" (transformers + peft), or "unsloth" (`from_pretrained`
        sets it)."""
        self._trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._ema = self._current_trainable_fp32() if teacher == "ema" else None
        self._start: dict[str, torch.Tensor] | None = None
        """The adapter weights the run started from (`mark_start`; ``init_adapter``), or None: the
        run started from a fresh adapter, the base model."""

    @classmethod
    def from_pretrained(cls, model_name: str, *, dtype: str = "float32", quantization: str | None = None,
                        lora: LoraSettings | None = PAPER_LORA, adapter: str | Path | None = None,
                        gradient_checkpointing: bool = False, teacher: str = "frozen",
                        ema_decay: float = 0.999, backend: str = "hf", device: str | None = None,
                        seed: int = 0) -> Policy:
        """Load ``model_name`` (see `opsd_kit.models.resolve_model_path`) and build a policy.

        dtype: weights (and 4-bit compute) dtype. quantization: ``None`` or ``"4bit"`` (NF4,
        needs LoRA). adapter: a folder written by `save_adapter` to resume; its own config
        replaces ``lora``. backend: ``"hf"`` (transformers + peft) or ``"unsloth"`` (experimental:
        CUDA only, needs the unsloth package, never run by the tests). device: ``None`` picks CUDA when available.
        """
        _check_choice("dtype", dtype, DTYPES)
        _check_choice("quantization", quantization, QUANTIZATIONS)
        _check_choice("backend", backend, BACKENDS)
        _check_choice("teacher", teacher, TEACHERS)
        _check_ema_decay(ema_decay)
        if adapter is not None and lora is None:
            raise ValueError("adapter= resumes a LoRA adapter; it cannot be combined with lora=None")
        _check_lora_needed(lora, teacher, quantization == "4bit")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if backend == "unsloth":
            if adapter is not None:
                raise ValueError("adapter= is not supported with backend='unsloth'; use backend='hf'")
            model = _load_unsloth(model_name, dtype, quantization, lora, gradient_checkpointing, device, seed)
            policy = cls(model, models.load_tokenizer(model_name), teacher=teacher, ema_decay=ema_decay, seed=seed)
            policy.backend = "unsloth"
            return policy
        tokenizer = models.load_tokenizer(model_name)
        if quantization == "4bit":
            model = models.load_causal_lm(model_name, dtype=dtype, quantization="4bit",
                                          device_map={"": device})
        else:
            model = models.load_causal_lm(model_name, dtype=dtype).to(device)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        return cls(model, tokenizer, lora=lora, teacher=teacher, ema_decay=ema_decay,
                   gradient_checkpointing=gradient_checkpointing, seed=seed)

    # ------------------------------------------------------------------------------------
    # the model's parts
    @property
    def config(self):
        """The base model's transformers config."""
        return self.causal_lm.config

    @property
    def causal_lm(self):
        """The transformers causal LM (inside the `PeftModel` when there is an adapter)."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    @property
    def head(self) -> torch.nn.Module:
        """The output embedding (hidden states -> logits)."""
        return self.causal_lm.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        """Where the model's input embeddings live (where inputs should go)."""
        return self.causal_lm.get_input_embeddings().weight.device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (the LoRA weights, or all with lora=None)."""
        return [p for _, p in self._trainable]

    def backbone_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        position_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` (after the final norm), without computing logits.

        Runs the decoder inside the causal LM, so whatever adapter state is active (student,
        or the teacher inside `teacher`) applies. ``self.head(hidden)`` gives the logits.
        ``cache`` (a transformers ``DynamicCache``): the key/value states of the columns before
        ``input_ids`` (``attention_mask`` then covers those columns too), extended in place with
        this call's own, gradients included; None: no cache.
        """
        decoder = self.causal_lm.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def completion_hidden(self, batch: Batch) -> torch.Tensor:
        """Final hidden states at the columns that predict ``batch``'s completion tokens:
        ``[B, C, H]`` (`prompts.Batch.predicting_slice`), under whatever adapter state is active.
        A prompt prefix all rows share (``batch.shared_prefix``) runs once
        (`hidden_sharing_prefix`) where that equals the whole rows' forward (`can_run_in_pieces`)."""
        b = batch.to(self.device)
        if b.shared_prefix and self.can_run_in_pieces():
            hidden_BWH, _, _ = self.hidden_sharing_prefix(b.input_ids, b.attention_mask, b.position_ids,
                                                          b.prompt_width, b.shared_prefix)
            return hidden_BWH[:, b.predicting_slice(prefix_removed=True)]
        return self.backbone_hidden(b.input_ids, b.attention_mask, b.position_ids)[:, b.predicting_slice()]

    def hidden_sharing_prefix(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                              position_ids_BT: torch.Tensor, prompt_width: int, prefix: int):
        """`backbone_hidden` of left-padded rows whose first ``prefix`` real tokens are the same in
        every row (`prompts.shared_prefix_length`): those run once, as one row, and every row
        continues from their key/value states (expanded, so gradients sum over the rows).

        Returns ``(hidden_BWH, cache, cache_mask_BT)``: the final hidden states of each row's
        other columns in the layout ``[pads | rest of the row]`` (W = T - prefix, so column
        ``prompt_width - prefix - 1`` is every row's last prompt token), the ``DynamicCache`` of
        all T columns in the layout ``[prefix | pads | rest]`` and its attention mask. Equal to
        the whole rows' forward up to floating-point order where `can_run_in_pieces` holds (callers
        check it). ``prefix = 0``: one forward of the rows as they are, into the cache.
        """
        from transformers import DynamicCache

        from opsd_kit.prompts import columns_after_prefix, first_real_column

        B = input_ids_BT.shape[0]
        start = int(first_real_column(attention_mask_BT[:1], prompt_width))
        cache = DynamicCache()
        if prefix:
            self.backbone_hidden(input_ids_BT[:1, start:start + prefix], None,
                                 torch.arange(prefix, device=input_ids_BT.device)[None], cache=cache)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.expand(B, -1, -1, -1), layer.values.expand(B, -1, -1, -1)
        cols_BW = columns_after_prefix(attention_mask_BT, prompt_width, prefix)
        cache_mask_BT = torch.cat([attention_mask_BT.new_ones(B, prefix), attention_mask_BT.gather(1, cols_BW)], 1)
        hidden_BWH = self.backbone_hidden(input_ids_BT.gather(1, cols_BW), cache_mask_BT,
                                          position_ids_BT.gather(1, cols_BW), cache=cache)
        return hidden_BWH, cache, cache_mask_BT

    def can_run_in_pieces(self, training: bool | None = None) -> bool:
        """Whether a forward may run in pieces over a transformers cache (some columns, then the
        rest attending to their key/value states, padding columns between them) and equal the
        one-piece forward: transformers' modules with plain causal attention placed by position ids
        (`models.plain_attention_error`: no sliding window, no other layer types); in train
        mode also no dropout (each piece would draw its own masks) and no gradient checkpointing
        (its layers drop the cache). ``training``: the mode the forward will run in (default: the
        model's current mode)."""
        if self.backend != "hf" or models.plain_attention_error(self.causal_lm.config) is not None:
            return False
        if not (self.model.training if training is None else training):
            return True
        return self.trains_as_it_scores()

    def trains_as_it_scores(self) -> bool:
        """Whether a forward in train mode computes, bit for bit, what the same forward computes in
        eval mode (`scoring`) with the same weights and inputs: the ``hf`` backend, no dropout
        (attention, any ``Dropout`` module, the adapter's) and no gradient checkpointing (in train
        mode its layers drop the cache, so `completion_hidden` runs whole rows, not pieces)."""
        if self.backend != "hf":
            return False
        dropout = getattr(self.causal_lm.config, "attention_dropout", 0.0) or any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules())
        return not (dropout or self.causal_lm.is_gradient_checkpointing)

    # ------------------------------------------------------------------------------------
    # teacher
    @contextmanager
    def teacher(self):
        """Inside, the model computes as the teacher: no gradients, eval mode, and the
        frozen / live / EMA weights. Everything (weights, mode) is restored on exit."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._teacher_weights():
                yield self
        finally:
            self.model.train(was_training)

    @contextmanager
    def scoring(self):
        """Inside, the model computes with its current weights (adapter on) in the teacher's
        mode: no gradients, eval mode (no dropout). Restored on exit."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            self.model.train(was_training)

    def _teacher_weights(self):
        if self.teacher_mode == "frozen":
            return self.start_weights()
        if self.teacher_mode == "ema":
            return self._ema_weights()
        return nullcontext()

    def mark_start(self) -> None:
        """Make the current adapter the model the run started from: the frozen teacher and GRPO's
        KL reference (`start_weights`) compute with it from now on (a run from ``init_adapter``:
        the initial model, as the paper's frozen teacher is). Saved in checkpoints (`extra_state`)."""
        self._require_lora("mark_start")
        self._start = self._current_trainable_fp32()

    @property
    def swaps_teacher_weights(self) -> bool:
        """Whether `teacher` writes other weights into the trainable parameters (EMA, or the frozen
        teacher of a run that started from an adapter): no autograd graph may span a teacher pass."""
        return self.teacher_mode == "ema" or (self.teacher_mode == "frozen" and self._start is not None)

    def start_weights(self):
        """Inside, the model is the one the run started from: the base model (the adapter switched
        off), or the adapter of `mark_start` written into the trainable weights (restored on exit)."""
        if self._start is None:
            return self.model.disable_adapter()
        return self._swapped_in(self._start)

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema = decay * ema + (1 - decay) * current``; call after each optimizer step."""
        if self._ema is None:
            raise RuntimeError(f"update_ema() needs teacher='ema' (this policy's teacher is "
                               f"{self.teacher_mode!r})")
        for name, p in self._trainable:
            self._ema[name].lerp_(p.detach().float(), 1.0 - self.ema_decay)

    def _ema_weights(self):
        return self._swapped_in(self._ema)

    @contextmanager
    def _swapped_in(self, weights: dict[str, torch.Tensor]):
        """Inside, the trainable parameters hold ``weights``; the current values are restored on exit."""
        saved = [p.detach().clone() for _, p in self._trainable]
        with torch.no_grad():
            for name, p in self._trainable:
                p.copy_(weights[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), current in zip(self._trainable, saved):
                    p.copy_(current)

    def extra_state(self) -> dict:
        """State beyond the adapter that a checkpoint needs (the EMA teacher's weights, the
        weights the run started from)."""
        state = {}
        if self._start is not None:
            state["start"] = {k: v.detach().cpu().clone() for k, v in self._start.items()}
        if self._ema is not None:
            state.update(ema_decay=self.ema_decay, ema={k: v.detach().cpu().clone() for k, v in self._ema.items()})
        return state

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned."""
        state = dict(state)
        start = state.pop("start", None)
        if (start is None) != (self._start is None):
            raise ValueError("checkpoint and policy disagree on the weights the run started from (init_adapter): "
                             f"the checkpoint {'has none' if start is None else 'has them'}, the policy "
                             f"{'has none' if self._start is None else 'has them'}")
        if start is not None:
            if set(start) != set(self._start):
                raise ValueError("checkpoint's start weights do not match this policy's trainable parameters")
            self._start = {k: v.to(self._start[k].device, torch.float32).clone() for k, v in start.items()}
        if self._ema is None:
            if state:
                raise ValueError(f"checkpoint holds EMA state but this policy's teacher is {self.teacher_mode!r}")
            return
        if set(state.get("ema", {})) != set(self._ema):
            raise ValueError("checkpoint's EMA weights do not match this policy's trainable parameters")
        for name, value in state["ema"].items():
            self._ema[name].copy_(value)

    # ------------------------------------------------------------------------------------
    # adapter I/O
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable weights, by parameter name."""
        return {n: p.detach().cpu().clone() for n, p in self._trainable}

    def save_adapter(self, path: str | Path) -> None:
        """Write the adapter in peft's format (adapter_config.json + adapter_model.safetensors).

        adapter_config.json names the base by its public id (`models.public_model_id`), not by a
        cache folder of this machine, and README.md is a kit card (`opsd_kit.run.card`) instead of
        peft's empty template; `models.ADAPTER_BASE_FILE` records how the base was loaded here (the kit's
        model name, dtype, quantization) so that `opsd_kit.apps.export` reloads exactly those weights.
        """
        self._require_lora("save_adapter")
        name_or_path = self.config.name_or_path
        public = models.public_model_id(name_or_path)
        self.model.save_pretrained(str(path))  # with the local base, so peft never asks the hub about it
        adapter_config = Path(path) / "adapter_config.json"
        adapter_config.write_text(json.dumps(dict(json.loads(adapter_config.read_text()),
                                                  base_model_name_or_path=public), indent=2) + "\n")
        base = {"model": models.kit_model_name(name_or_path), "base_model": public,
                "dtype": str(self.causal_lm.dtype).removeprefix("torch."),
                "quantization": "4bit" if self.quantized else None}
        (Path(path) / models.ADAPTER_BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
        write_card(path, public, model=base["model"])

    def load_adapter(self, path: str | Path) -> None:
        """Load adapter weights saved by `save_adapter` (or peft) into this policy's adapter.

        The saved adapter's settings must match this policy's. The EMA teacher, if any,
        restarts from the loaded weights (`load_extra_state` restores a saved EMA).
        """
        self._require_lora("load_adapter")
        saved = LoraSettings.from_peft(peft.PeftConfig.from_pretrained(str(path)))
        if saved != LoraSettings.from_peft(self.model.peft_config[self.model.active_adapter]):
            raise ValueError(f"adapter at {path} has settings {asdict(saved)}, this policy has "
                             f"{asdict(self.lora)}")
        weights = peft.utils.load_peft_weights(str(path), device=str(self.device))
        result = peft.set_peft_model_state_dict(self.model, weights)
        if result.unexpected_keys:
            raise ValueError(f"adapter at {path} has unexpected weights: {result.unexpected_keys[:5]}")
        if self._ema is not None:
            self._ema = self._current_trainable_fp32()

    def _require_lora(self, what: str) -> None:
        if self.lora is None:
            raise ValueError(f"{what}() needs a LoRA adapter; this policy was built with lora=None")

    def _current_trainable_fp32(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().clone() for n, p in self._trainable}


# ----------------------------------------------------------------------------------------
# helpers
def build_policy(cfg: TrainConfig, device: str | None = None) -> Policy:
    """The policy a run trains, built from its config: the one place a config becomes a model.
    A run that trains all weights with an algorithm that runs no teacher (`TrainConfig.uses_teacher`)
    gets the live teacher, which needs no adapter. ``device``: ``None`` picks CUDA when available."""
    lora = (LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=tuple(cfg.lora_target_modules)) if cfg.use_lora else None)
    return Policy.from_pretrained(cfg.model, dtype=cfg.dtype, quantization=cfg.quantization, lora=lora,
                                  gradient_checkpointing=cfg.gradient_checkpointing,
                                  teacher=cfg.teacher_weights if cfg.uses_teacher or cfg.use_lora else "live",
                                  ema_decay=cfg.ema_decay, backend=cfg.backend, device=device, seed=cfg.seed)


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_plain_head(config) -> None:
    """The losses compute logits as ``head(hidden)``; refuse models whose forward transforms
    logits after the head (soft-capping, scaling), which that path would silently skip."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if softcap or scale not in (None, 1, 1.0):
        raise ValueError(f"{type(config).__name__} post-processes its logits (final_logit_softcapping={softcap}, "
                         f"logit_scale={scale}); opsd_kit's chunked losses take logits as head(hidden) and do "
                         "not support such models yet")


def _check_ema_decay(ema_decay: float) -> None:
    if not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}")


def _check_lora_needed(lora: LoraSettings | None, teacher: str, quantized: bool) -> None:
    """`config.lora_error` for a policy built with ``lora`` (None: no adapter)."""
    error = lora_error(use_lora=lora is not None, teacher=teacher, quantization="4bit" if quantized else None)
    if error:
        raise ConfigError(error)


def _disable_cpu_repacking(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (see module doc)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _load_unsloth(model_name, dtype, quantization, lora, gradient_checkpointing, device, seed):
    """Load through unsloth's FastLanguageModel and attach its LoRA (CUDA only)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise RuntimeError(f"backend='unsloth' needs a CUDA GPU (device is {device!r}); use backend='hf'")
    if lora is None:
        raise ValueError("backend='unsloth' needs LoRA; use lora=LoraSettings() or backend='hf'")
    try:
        from unsloth import FastLanguageModel
    except ImportError as err:
        raise RuntimeError("backend='unsloth' needs the unsloth package (pip install unsloth); "
                           "or use backend='hf'") from err
    model, _ = FastLanguageModel.from_pretrained(
        model_name=models.resolve_model_path(model_name), dtype=models._torch_dtype(dtype),
        load_in_4bit=quantization == "4bit",
    )
    return FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias="none",
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False, random_state=seed,
    )
