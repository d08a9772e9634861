"""Training configuration: one dataclass, a docstring under every field, validated before any
model loads. Profiles (`tiny`, `cpu-demo`, `paper`, `paper-qlora`) are named sets of overrides;
`eval_protocol_for` gives the evaluation protocol that goes with a run's profile.

Knob names carry their meaning: `jsd_beta` is only the JSD mixing weight, `kl_coef` only
GRPO's KL penalty, `clip_tau` only OPSD's pointwise clipping, `ratio_clip_eps` only GRPO's
importance-ratio clip. Each field says, through `knob`, which algorithms it applies to (another
algorithm must leave it at its default), whether a resumed run may change it (`resumable_fields`)
and whether it fixes the model (`model_fields`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from opsd_kit.data.answers import GRADING_MODES
from opsd_kit.prompts import (
    GRPO_STUDENT_TEMPLATE,
    INSTRUCTION,
    OPSD_SAMPLED_STUDENT_TEMPLATE,
    PROBLEM_STUDENT_TEMPLATE,
    PROMPT_FORMATS,
    RLSD_TEACHER_TEMPLATE,
    SFT_STUDENT_TEMPLATE,
    STUDENT_TEMPLATE,
    TEACHER_TEMPLATE,
    template_error,
)
from opsd_kit.rollout.hf import backend_error

ALGORITHMS = ("opsd", "grpo", "sft", "rlsd")
SAMPLING = ("opsd", "grpo", "rlsd")  # sample rollouts from the student (SFT generates nothing)
TEACHING = ("opsd", "rlsd")  # run the privileged teacher on its own prompt
GROUP_ALGORITHMS = ("grpo", "rlsd")  # sample num_generations rollouts per problem, group-relative advantages
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "topk", "sampled_token", "hint_contrast")
TEACHER_HINTS = ("reference", "shuffled")
TEACHERS = ("frozen", "live", "ema")
RLSD_TEACHERS = ("live", "frozen")
LOSS_NORMALISATIONS = ("token", "sequence")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "4bit")
BACKENDS = ("hf", "unsloth")
ROLLOUT_BACKENDS = ("hf", "fast", "vllm")
EVAL_ENGINES = ("fast", "hf")  # evaluation's sampling engines (`EvalConfig.engine`)
SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = ("tensorboard", "wandb")
REWARD_NAMES = ("correct", "correct_strict", "correct_lenient", "format", "paper")
"""The built-in GRPO/RLSD rewards by name (`opsd_kit.algorithms.rewards` defines them)."""


class ConfigError(ValueError):
    """An invalid configuration; raised before any model or data loads."""


def knob(default, *, applies: tuple = ALGORITHMS, resumable: bool = False, model: bool = False):
    """A `TrainConfig` field: its ``default``; the algorithms it ``applies`` to (`validate` refuses a
    value other than the default for any other algorithm, and `load_profile` gives a profile's value
    only to these); whether a resumed run may change it (``resumable``: it does not change what is
    trained, `resumable_fields`); whether it fixes the model's weights and adapter layout
    (``model``, `model_fields`)."""
    if not applies or set(applies) - set(ALGORITHMS):
        raise ValueError(f"applies={applies!r}: name algorithms among {list(ALGORITHMS)}")
    return dataclasses.field(default=default, metadata={"applies": tuple(applies), "resumable": resumable,
                                                         "model": model})


@dataclass
class TrainConfig:
    # -- run -------------------------------------------------------------------------------
    algorithm: str = knob("opsd")
    """Which trainer: 'opsd' (on-policy self-distillation), 'grpo' or 'sft' (baselines), or
    'rlsd' (GRPO with the privileged teacher's token-level credit, `opsd_kit.algorithms.rlsd`)."""
    profile: str | None = knob(None)
    """Which profile built this config (set by `load_profile`; None: built by hand). It picks
    the evaluation protocol that goes with the run (`eval_protocol_for`)."""
    run_dir: str = knob("runs/opsd", resumable=True)
    """Folder for metrics.jsonl, checkpoints and the final adapter."""
    seed: int = knob(0)
    """Seeds python, numpy and torch; rollout seeds and problem order derive from it."""
    max_steps: int = knob(100, resumable=True)
    """Optimizer steps (`paper`: 200 for OPSD; the official scripts' epochs for GRPO, SFT, RLSD). A
    resumed run may change it (to extend a finished run) when the learning rates of the steps it
    took do not depend on it, so that it trains exactly as a fresh run of the new max_steps:
    lr_schedule='constant', or a linear or cosine run still in warmup (at most warmup_steps + 1
    steps taken). A linear or cosine run past warmup is refused with the ways out: its rate decayed
    toward the old max_steps and would jump to the new schedule's
    (`opsd_kit.run.rundir.max_steps_change_error`)."""
    max_generated_tokens: int | None = knob(None, applies=SAMPLING, resumable=True)
    """Rollout-token budget: stop after the step at which the run's generated tokens (all
    processes) reach it, even before max_steps. None: no budget. A token-matched comparison
    gives each method the same budget."""
    resume: bool | None = knob(None, resumable=True)
    """None = resume when run_dir holds checkpoints of the same config (else start fresh; another
    config is refused), True = require a checkpoint to resume from (error if none), False = start
    fresh, which needs overwrite=True when checkpoints exist. "The same config" ignores the keys
    that do not change what is trained (`resumable_fields`)."""
    overwrite: bool = knob(False, resumable=True)
    """Allow a fresh run to delete run_dir's checkpoints and final adapter (resume=False, or
    resume=None with checkpoints of another config). Nothing is ever deleted without it."""

    # -- model -----------------------------------------------------------------------------
    model: str = knob("smollm2-135m-instruct", model=True)
    """'tiny', 'smollm2-135m-instruct' (bundled), a hub id or a local folder."""
    dtype: str = knob("float32", model=True)
    """Weights and compute dtype: 'float32', 'bfloat16' or 'float16'."""
    quantization: str | None = knob(None, model=True)
    """None or '4bit' (bitsandbytes NF4, double quantisation; QLoRA)."""
    use_lora: bool = knob(True, model=True)
    """Train a LoRA adapter (required by the frozen teacher); False trains all weights."""
    lora_r: int = knob(64, model=True)
    """LoRA rank (paper: 64)."""
    lora_alpha: int = knob(128, model=True)
    """LoRA scaling numerator (paper: 128)."""
    lora_dropout: float = knob(0.0)
    """Dropout on the LoRA input."""
    lora_target_modules: tuple = knob(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                      model=True)
    """Module names that receive LoRA (paper: all attention and MLP projections)."""
    gradient_checkpointing: bool = knob(False, resumable=True)
    """Recompute activations in backward to save memory."""
    backend: str = knob("hf")
    """Model backend: 'hf' (transformers + peft) or 'unsloth' (experimental: CUDA only, installed
    separately, and never run by the tests, which have no GPU)."""
    rollout_backend: str = knob("hf", applies=SAMPLING)
    """Rollout engine: 'hf' (transformers' generate, the reference), 'fast' (opsd_kit's fused
    decoder: the LoRA adapter merged into a copy of the weights before each rollout, fused
    projections, a static KV cache; Llama/Qwen layouts, else generate with the adapter merged;
    not with 4-bit; bench/rollout.py) or 'vllm' (GPU, not with 4-bit)."""

    # -- data and prompts -------------------------------------------------------------------
    train_data: str = knob("reasoning_gym:chain_sum")
    """Training problems: a source spec understood by opsd_kit.data.sources.load_source, or a file."""
    train_size: int = knob(512)
    """How many training problems to load."""
    max_prompt_tokens: int = knob(1024)
    """Cap on either prompt; over-long teacher prompts lose the middle of the reference solution
    (its beginning and its final answer stay; `prompts.middle_cut`)."""
    student_thinking: bool | None = knob(None)
    """Chat-template `enable_thinking` for the student (paper: False; None: not passed)."""
    teacher_thinking: bool | None = knob(None, applies=TEACHING)
    """Chat-template `enable_thinking` for the teacher (paper: True; None: not passed)."""
    student_prompt_format: str = knob("chat")
    """How the student's message becomes its prompt: 'chat' (the tokenizer's chat template with
    the generation prompt, `student_thinking` applied) or 'plain' (the message text alone, no
    chat template, no special tokens: the official grpo_train.py L111 prompt, and the student
    prompt of the published OPSD numbers per the official README's implementation note). The
    teacher's prompt is always chat-templated, as in the official code."""
    student_template: str = knob(STUDENT_TEMPLATE)
    """The student's message, a `str.format` template: `{question}` (required) and `{instruction}`."""
    teacher_template: str = knob(TEACHER_TEMPLATE, applies=TEACHING)
    """The teacher's message. The default follows the paper's teacher prompt: the problem, a line
    announcing a reference solution, the solution between begin/end markers, a transition asking
    the model to understand it and solve the problem again in its own words, then the
    instruction. `{question}` and `{solution}` are required, `{instruction}` optional; literal
    braces are written `{{` `}}`."""
    instruction: str = knob(INSTRUCTION)
    """The answer-format instruction both prompts end with (inserted as `{instruction}`)."""
    teacher_hint: str = knob("reference", applies=("opsd",))
    """The solution in the teacher's prompt: 'reference' (the problem's own verified solution:
    OPSD) or 'shuffled' (another training problem's, with a different answer where possible; a
    control run: the divergence left under a wrong hint is style, not task content). The
    shuffled assignment (`prompts.shuffled_hints`) is fixed by the seed for the whole run."""

    # -- rollouts --------------------------------------------------------------------------
    max_new_tokens: int = knob(1024, applies=SAMPLING)
    """Completion cap for training rollouts (paper v3: 1024). SFT generates nothing: its
    targets are capped by `max_target_tokens` instead."""
    max_target_tokens: int | None = knob(None, applies=("sft", "opsd"))
    """SFT target cap: reference solutions longer than this many tokens (EOS included) are cut;
    None = no cap (every target must then fit the model's context after its prompt). Used by
    SFT and by OPSD + SFT's SFT term (``sft_weight`` > 0) (`paper` SFT: 16,000, the official SFT
    script's max length)."""
    temperature: float = knob(1.1, applies=SAMPLING)
    """Rollout sampling temperature (paper: OPSD 1.1, GRPO 1.2)."""
    top_p: float = knob(0.95, applies=SAMPLING)
    """Rollout nucleus truncation (1.0 is off)."""
    top_k: int = knob(20, applies=SAMPLING)
    """Rollout top-k truncation (0 is off)."""
    generation_batch_size: int = knob(16, applies=SAMPLING, resumable=True)
    """Sequences per generate call."""

    # -- OPSD loss -------------------------------------------------------------------------
    divergence: str = knob("forward_kl", applies=("opsd",))
    """'forward_kl' KL(p_T||p_S) (paper v3), 'reverse_kl', 'jsd', 'topk' (forward KL over the
    teacher's top-k tokens), 'sampled_token' (policy-gradient form) or 'hint_contrast': KL(r || p_S)
    with r = sg(p_S) (c / w)^contrast_alpha normalised, c the teacher with the correct hint and w with a
    shuffled one (`losses.hint_contrast_divergence`): what the correct hint adds over the style
    both teachers share. It costs a third forward pass (the wrong-hint teacher)."""
    jsd_beta: float = knob(0.5, applies=("opsd",))
    """JSD mixing weight beta in M = beta p_T + (1 - beta) p_S; used only when divergence='jsd'."""
    clip_tau: float | None = knob(None, applies=("opsd",))
    """Pointwise clipping: each vocabulary entry's contribution is min(l_v, tau) (paper v3: 0.05);
    for 'hint_contrast' the entries r_v (log r_v - log p_S(v))."""
    contrast_alpha: float = knob(1.0, applies=("opsd",))
    """Strength alpha of the contrast in divergence='hint_contrast' (> 0): r = sg(p_S) e^{alpha d} normalised,
    d = clip(log c - log w, -contrast_clip, contrast_clip)."""
    contrast_clip: float | None = knob(1.0, applies=("opsd",))
    """divergence='hint_contrast': the teachers' log-ratio log c - log w is clipped to [-L, L], L this
    value (> 0; None: unbounded), so that every token's tilt lies in [e^{-alpha L}, e^{alpha L}] and
    r_v <= p_S(v) e^{2 alpha L}: a token the wrong-hint teacher all but rules out cannot take the
    student's mass (`losses.hint_contrast_divergence`; RLSD clips its token weights alike)."""
    sft_weight: float = knob(0.0, applies=("opsd",))
    """OPSD only: weight of the SFT loss (the NLL of the problem's reference solution after the
    student prompt, as algorithm='sft' trains) added to the divergence: loss = divergence +
    sft_weight * SFT, each a sum over its own tokens divided by the step's count of those tokens
    (metrics `loss/divergence`, `loss/sft`). 0: plain OPSD; > 0 anchors OPSD to the reference
    solution. SFT targets are capped by `max_target_tokens`."""
    loss_temperature: float | None = knob(None, applies=("opsd",))
    """Temperature dividing both logits in the loss; None uses the rollout temperature (paper)."""
    loss_support: str = knob("full", applies=("opsd",))
    """'full': the loss uses the untruncated distributions; 'truncated': both are restricted to
    the rollout's top-k/top-p support of the student (docs/algorithm.md, Pitfalls, 5)."""
    distill_topk: int = knob(20, applies=("opsd",))
    """k for divergence='topk'."""
    sampled_token_clamp: float | None = knob(5.0, applies=("opsd",))
    """Advantage clamp for divergence='sampled_token' (rLLM: 5)."""
    teacher: str = knob("frozen", applies=("opsd",))
    """OPSD's teacher: 'frozen' (the initial model, frozen: the base model with the adapter off, or
    with `init_adapter` the base model with that adapter; paper), 'live' (current weights) or 'ema'.
    RLSD's is `rlsd_teacher`."""
    ema_decay: float = knob(0.999, applies=("opsd",))
    """EMA decay of the LoRA weights for teacher='ema'."""
    loss_chunk_size: int = knob(128, resumable=True)
    """Sequence positions per chunk of the divergence; bounds the logits held at once."""

    # -- GRPO ------------------------------------------------------------------------------
    num_generations: int = knob(8, applies=GROUP_ALGORITHMS)
    """GRPO group size G: rollouts per problem (paper: 8)."""
    num_iterations: int = knob(2, applies=GROUP_ALGORITHMS)
    """GRPO optimizer steps per batch of rollouts (`paper`: 1 for GRPO, TRL's default that
    run_grpo.sh inherits; 2 for RLSD, run_rlsd_1b.sh L16)."""
    ratio_clip_eps: float = knob(0.2, applies=GROUP_ALGORITHMS)
    """GRPO importance-ratio clip epsilon."""
    scale_rewards: bool = knob(True, applies=GROUP_ALGORITHMS)
    """GRPO: divide group-centred rewards by the group's standard deviation."""
    kl_coef: float = knob(0.0, applies=GROUP_ALGORITHMS)
    """GRPO KL penalty to the reference model, the one the run started from (the adapter off, or
    `init_adapter`); 0 as in the paper."""
    loss_normalisation: str = knob("token", applies=GROUP_ALGORITHMS)
    """How GRPO's (and RLSD's) summed surrogate is normalised: 'token' (divided by the step's
    completion tokens: every token weighs the same) or 'sequence' (each rollout's token sum
    divided by its own length, then the mean over the step's rollouts: TRL's loss_type 'grpo',
    which the official run_grpo.sh L28 and run_rlsd_1b.sh L36 set; a long rollout's tokens
    each weigh less)."""
    grading_mode: str = knob("strict", applies=SAMPLING)
    """Reward and rollout-correctness grading: 'strict' (the last boxed answer only), 'lenient'
    (also '####', 'the answer is', else the last number), or the official training rewards:
    'first_box_exact' (the first box, stripped lower-case exact match: grpo_train.py) and
    'first_box_after_think' (the first box after </think>, math_verify, then a whitespace-free
    match: rlsd_train.py); see opsd_kit.data.answers and opsd_kit.evaluation.grading. The
    reward 'correct' grades in this mode."""
    rewards: tuple = knob(("correct",), applies=GROUP_ALGORITHMS)
    """GRPO/RLSD reward terms, summed with `reward_weights` (`opsd_kit.algorithms.rewards`): 'correct'
    (1 when the answer, read in `grading_mode`, is right), 'correct_strict', 'correct_lenient',
    'format' (1 when the last box is present, closed and non-empty) or 'paper' (the official GRPO
    script's reward: the FIRST box, normalised exact string match). Each is logged as
    `reward/<name>`. Code can pass its own callables (`train(..., reward_funcs=...)`)."""
    reward_weights: tuple = knob((), applies=GROUP_ALGORITHMS)
    """One weight per entry of `rewards` (empty: every weight 1)."""
    init_adapter: str | None = knob(None)
    """Start from another run's LoRA adapter: a run folder (its final `adapter/`) or an adapter
    folder. None: a fresh adapter (LoRA B = 0, the base model). The frozen teacher and GRPO's KL
    reference are then the base model with this adapter: the initial model, as in the paper. A
    resumed run loads its own checkpoint, not this adapter. The model card records it, with the
    init run's training data."""

    # -- RLSD ------------------------------------------------------------------------------
    rlsd_lambda: float = knob(0.5, applies=("rlsd",))
    """RLSD: initial mixing weight lambda_0 of the teacher's token weights in
    A_t = A ((1 - lambda) + lambda w_t); decays linearly to 0 (official rlsd_trainer.py: 0.5)."""
    rlsd_eps: float = knob(0.2, applies=("rlsd",))
    """RLSD: token weights are clipped to [1 - eps, 1 + eps] (official rlsd_trainer.py: 0.2)."""
    rlsd_decay_steps: int = knob(50, applies=("rlsd",))
    """RLSD: optimizer steps over which lambda decays linearly from rlsd_lambda to 0 (official
    rlsd_trainer.py: 50); from then on RLSD is plain GRPO. <= 0: lambda stays rlsd_lambda at
    every step (constant, as the official rlsd_trainer.py L41-42 allows)."""
    rlsd_teacher: str = knob("live", applies=("rlsd",))
    """RLSD's teacher: 'live' (the current policy, adapter on, reading the privileged prompt, as
    the official rlsd_trainer.py L100-109 scores it: delta_t is then only what the reference
    solution adds) or 'frozen' (the initial model: the base with the adapter off, or the `init_adapter`;
    delta_t also holds the policy's
    drift from the base). OPSD's teacher is `teacher`."""

    # -- optimisation ----------------------------------------------------------------------
    learning_rate: float = knob(2e-4)
    """AdamW learning rate (the `paper` profile: 2e-4, as the official Qwen3-1.7B launch script
    scripts/run_opsd_1b.sh)."""
    weight_decay: float = knob(0.0)
    """AdamW weight decay."""
    max_grad_norm: float = knob(1.0)
    """Gradient clipping norm (1.0: TRL's default, which the official launch scripts inherit)."""
    lr_schedule: str = knob("constant")
    """'constant', 'linear' or 'cosine' decay after warmup."""
    warmup_steps: int = knob(0)
    """Linear warmup steps: the learning rate factor is step / warmup_steps from step 0 (the
    `transformers.get_scheduler` convention; 0 at the first step), then the schedule."""
    problems_per_step: int = knob(32)
    """Problems in one optimizer step, over all processes (paper: 32)."""
    micro_batch_size: int = knob(4, resumable=True)
    """Sequences per forward/backward; the step accumulates gradients over micro-batches."""
    max_nonfinite_steps: int = knob(3)
    """Non-finite loss or gradient: skip the step; this many in a row stops the run."""

    # -- logging and checkpoints -----------------------------------------------------------
    save_every: int = knob(25, resumable=True)
    """Checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = knob(2, resumable=True)
    """How many complete checkpoints to keep."""
    trackers: tuple = knob((), resumable=True)
    """Extra metric sinks: 'tensorboard', 'wandb'. metrics.jsonl is always written."""
    progress: bool = knob(True, resumable=True)
    """Show a tqdm progress bar."""

    # ---------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the key and the allowed values; return self."""
        self._check_types()
        choices = {
            "algorithm": ALGORITHMS, "divergence": DIVERGENCES, "teacher": TEACHERS,
            "lr_schedule": SCHEDULES, "dtype": DTYPES, "quantization": QUANTIZATIONS, "backend": BACKENDS,
            "rollout_backend": ROLLOUT_BACKENDS, "loss_support": ("full", "truncated"),
            "grading_mode": GRADING_MODES, "profile": (None, *_PROFILES),
            "teacher_hint": TEACHER_HINTS, "rlsd_teacher": RLSD_TEACHERS,
            "loss_normalisation": LOSS_NORMALISATIONS, "student_prompt_format": PROMPT_FORMATS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not allowed; choose one of {list(allowed)}")
        for t in self.trackers:
            if t not in TRACKERS:
                raise ConfigError(f"trackers contains {t!r}; allowed: {list(TRACKERS)}")
        self._check_applies()
        _check(self.max_generated_tokens is None or self.max_generated_tokens >= 1, "max_generated_tokens",
               self.max_generated_tokens, "None or an integer >= 1")
        positive = ("max_steps", "train_size", "max_prompt_tokens", "max_new_tokens", "generation_batch_size",
                    "problems_per_step", "micro_batch_size", "num_generations", "num_iterations",
                    "loss_chunk_size", "save_every", "keep_checkpoints", "lora_r", "lora_alpha",
                    "max_nonfinite_steps", "distill_topk")
        for key in positive:
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        for key in ("student_template", "teacher_template"):
            error = template_error(key, getattr(self, key))
            if error:
                raise ConfigError(error)
        _check(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", self.jsd_beta, "in [0, 1]")
        _check(self.contrast_alpha > 0, "contrast_alpha", self.contrast_alpha, "> 0")
        _check(self.contrast_clip is None or self.contrast_clip > 0, "contrast_clip", self.contrast_clip,
               "None or > 0")
        _check(self.sft_weight >= 0, "sft_weight", self.sft_weight, ">= 0")
        self._check_rewards()
        if self.init_adapter is not None and not self.use_lora:
            raise ConfigError(f"init_adapter={self.init_adapter!r} loads a LoRA adapter; use_lora=False trains "
                              "no adapter: set use_lora=True")
        _check(self.clip_tau is None or self.clip_tau > 0, "clip_tau", self.clip_tau, "None or > 0")
        _check(self.temperature > 0, "temperature", self.temperature, "> 0 (sampling is required)")
        _check(self.loss_temperature is None or self.loss_temperature > 0, "loss_temperature",
               self.loss_temperature, "None or > 0")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(self.top_k >= 0, "top_k", self.top_k, ">= 0 (0 is off)")
        _check(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "in (0, 1)")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        _check(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "> 0")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        _check(self.kl_coef >= 0, "kl_coef", self.kl_coef, ">= 0")
        _check(self.ratio_clip_eps > 0, "ratio_clip_eps", self.ratio_clip_eps, "> 0")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")
        _check(self.max_target_tokens is None or self.max_target_tokens >= 1, "max_target_tokens",
               self.max_target_tokens, "None (no cap) or an integer >= 1")
        if self.algorithm == "opsd" and not self.sft_weight and self.max_target_tokens is not None:
            raise ConfigError(f"max_target_tokens={self.max_target_tokens!r} caps the SFT targets of OPSD + SFT; "
                              "this OPSD run has sft_weight=0: set sft_weight > 0, or leave max_target_tokens unset")
        _check(0 <= self.rlsd_lambda <= 1, "rlsd_lambda", self.rlsd_lambda, "in [0, 1]")
        _check(0 <= self.rlsd_eps < 1, "rlsd_eps", self.rlsd_eps, "in [0, 1) (weights stay positive)")
        if self.sampled_token_clamp is not None:
            _check(self.sampled_token_clamp > 0, "sampled_token_clamp", self.sampled_token_clamp, "None or > 0")
        _check(isinstance(self.rlsd_decay_steps, int), "rlsd_decay_steps", self.rlsd_decay_steps,
               "an integer (<= 0: constant lambda)")
        error = (lora_error(use_lora=self.use_lora, teacher=self.teacher_weights if self.uses_teacher else None,
                            quantization=self.quantization,
                            teacher_key="rlsd_teacher" if self.algorithm == "rlsd" else "teacher")
                 or (backend_error(self.rollout_backend, quantization=self.quantization, use_lora=self.use_lora)
                     if self.algorithm in SAMPLING else None))
        if error:
            raise ConfigError(error)
        if self.kl_coef and not self.use_lora:
            raise ConfigError(f"kl_coef={self.kl_coef!r} needs use_lora=True: the KL reference is the model with "
                              "the adapter switched off; set kl_coef=0.0 to train all weights")
        if self.loss_support == "truncated" and self.divergence in ("topk", "sampled_token"):
            raise ConfigError(f"loss_support='truncated' applies to full-vocabulary divergences; divergence="
                              f"{self.divergence!r} has its own support: use loss_support='full'")
        if self.algorithm in GROUP_ALGORITHMS and self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 for {self.algorithm} (group-relative advantages "
                              "need a group)")
        if self.divergence == "hint_contrast" and self.teacher_hint == "shuffled":
            raise ConfigError("divergence='hint_contrast' contrasts the reference-hint teacher with a shuffled-hint "
                              "one; with teacher_hint='shuffled' the 'correct' teacher would hold a wrong hint too. "
                              "Use teacher_hint='reference' with hint_contrast")
        if self.resume and self.overwrite:
            raise ConfigError("resume=True continues run_dir's checkpoints; overwrite=True deletes them: set one "
                              "of them (overwrite=True with resume=False starts over)")
        return self

    def _check_applies(self) -> None:
        """Each field that does not apply to ``algorithm`` (`knob`'s ``applies``) holds its default."""
        for f in dataclasses.fields(self):
            applies = f.metadata["applies"]
            value = getattr(self, f.name)
            if self.algorithm not in applies and value != f.default:
                default = f" {f.default!r}" if len(repr(f.default)) <= 40 else ""  # not a whole template
                raise ConfigError(f"{f.name}={value!r} applies to algorithm {' or '.join(map(repr, applies))}, not "
                                  f"algorithm={self.algorithm!r}: leave it at its default{default}")

    def _check_rewards(self) -> None:
        """Every reward name is known (`REWARD_NAMES`) and every weight a finite number. That the
        weights match the rewards in number is checked where the run's reward functions are known
        (`opsd_kit.algorithms.rewards.reward_names`: ``reward_funcs`` given in code replace
        `rewards`), by the trainer before any model loads."""
        if not self.rewards:
            raise ConfigError(f"rewards=() gives GRPO no reward; name at least one of {sorted(REWARD_NAMES)}")
        for name in self.rewards:
            if name not in REWARD_NAMES:
                close = difflib.get_close_matches(str(name), REWARD_NAMES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"rewards contains {name!r}, which is not a reward; choose from "
                                  f"{sorted(REWARD_NAMES)}{hint}")
        for w in self.reward_weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError(f"reward_weights contains {w!r}; each weight must be a finite number")

    def _check_types(self) -> None:
        """Each field holds a value of its annotated type (ints are accepted as floats, a list
        as a tuple; a bool is never a number)."""
        for f in dataclasses.fields(self):
            names = [t.strip() for t in str(f.type).split("|")]
            value = getattr(self, f.name)
            ok = any(isinstance(value, _TYPES[t]) for t in names)
            if isinstance(value, bool) and "bool" not in names:
                ok = False
            if not ok:
                raise ConfigError(f"{f.name}={value!r} has type {type(value).__name__}; it must be "
                                  f"{' or '.join(names)}")

    def check_trackers(self) -> None:
        """Each tracker's package is installed (checked without importing it)."""
        import importlib.util

        for name in self.trackers:
            if importlib.util.find_spec(name) is None:
                raise ConfigError(f"trackers={tuple(self.trackers)!r} needs the {name!r} package, which is not "
                                  f"installed: pip install {name} (or pip install 'opsd_kit[tracking]'), or drop "
                                  f"{name!r} from trackers (metrics.jsonl is always written)")

    def check_world(self, world_size: int) -> int:
        """Problems each process handles per step; raise if the batch does not divide."""
        if self.problems_per_step % world_size:
            raise ConfigError(f"problems_per_step={self.problems_per_step} does not divide over "
                              f"{world_size} processes; it must be a multiple of {world_size}")
        return self.problems_per_step // world_size

    @property
    def teacher_weights(self) -> str:
        """The weights the run's teacher scores with: `rlsd_teacher` for RLSD, `teacher` else."""
        return self.rlsd_teacher if self.algorithm == "rlsd" else self.teacher

    @property
    def uses_teacher(self) -> bool:
        """Whether the algorithm runs the privileged teacher (OPSD's targets, RLSD's token credit)."""
        return self.algorithm in TEACHING

    def check_context(self, context_length: int | None, source: str = "the model config") -> None:
        """The longest sequence a step builds (a prompt of max_prompt_tokens followed by a
        completion of max_new_tokens, or for SFT and OPSD + SFT's SFT term a target of
        max_target_tokens) must fit the model's context; ``None`` skips the check. Without a target
        cap the prompt is checked here and each target once tokenised (`opsd_kit.algorithms.sft`)."""
        keys = {"sft": ("max_target_tokens",)}.get(self.algorithm, ("max_new_tokens",))
        if self.algorithm == "opsd" and self.sft_weight:
            keys += ("max_target_tokens",)
        for key in keys:
            lengths = {"max_prompt_tokens": self.max_prompt_tokens, key: getattr(self, key)}
            lengths = {k: v for k, v in lengths.items() if v is not None}
            total = sum(lengths.values())
            if context_length is not None and total > context_length:
                raise ConfigError(
                    f"{' + '.join(f'{k}={v}' for k, v in lengths.items())} = {total} exceeds the model's context of "
                    f"{context_length} tokens ({source}); lower them so that {' + '.join(lengths)} <= {context_length}")

    def rollout_settings(self, n: int = 1, max_new_tokens: int | None = None):
        """The rollout sampling settings, with ``n`` samples per prompt."""
        from opsd_kit.rollout.hf import GenerationSettings

        return GenerationSettings(max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, top_k=self.top_k, n=n, batch_size=self.generation_batch_size)

    @property
    def effective_loss_temperature(self) -> float:
        return self.temperature if self.loss_temperature is None else self.loss_temperature

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build and validate; unknown keys are an error that suggests the closest known key."""
        return cls(**_known_keys(cls, values, "config")).validate()

    @classmethod
    def from_saved(cls, values: dict) -> "TrainConfig":
        """A run folder's ``config.json`` as a config: keys that are no longer settings
        (`RETIRED_FIELDS`) dropped, and fields the run's algorithm does not read reset to their
        defaults (a saved profile may hold values there), then built as `from_dict`."""
        algorithm = values.get("algorithm", cls.algorithm)
        kept = {k: v for k, v in values.items() if k not in RETIRED_FIELDS
                and (k not in _FIELDS or algorithm in _FIELDS[k].metadata["applies"])}
        return cls.from_dict(kept)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

RETIRED_FIELDS = {"share_prompt_pass": "decided by the algorithm (`OPSD.prompt_pass.enabled`)"}
"""Keys an older run's config.json may hold that are no longer settings, and what took their place;
`TrainConfig.from_saved` and resuming ignore them."""


@dataclass
class EvalConfig:
    """How held-out accuracy is measured, separate from how a run trains: which problems,
    how the student decodes, how many samples, how answers are graded, and how intervals are
    drawn. Profiles (`load_eval_profile`) name the protocols: `tiny`, `cpu-demo`, `paper`."""

    data: str = ""
    """Held-out source: a spec for `opsd_kit.data.sources.load_source` or a file; "" means the caller
    passes the problems (the demo passes notebook 00's leakage-checked `eval.jsonl`)."""
    size: int | None = None
    """How many held-out problems to load from `data` (None: all)."""
    benchmarks: tuple = ()
    """Further named held-out sets evaluated one by one (the paper's protocol: AIME24, AIME25,
    HMMT25); each entry is a source spec like `data`."""
    k: int = 1
    """Samples per problem; accuracy is avg@k, the mean over problems of each problem's
    fraction correct (the paper's metric: avg@12 in v3, 16 in the official README)."""
    temperature: float = 0.0
    """Decoding temperature; 0 is greedy (then k must be 1: greedy samples are identical)."""
    top_p: float = 1.0
    """Nucleus truncation when sampling (1.0 is off)."""
    top_k: int = 0
    """Top-k truncation when sampling (0 is off)."""
    max_new_tokens: int = 128
    """Completion cap. Set it so that answers can finish: `truncation_rate` in the results
    says how many did not."""
    student_thinking: bool | None = None
    """Chat-template `enable_thinking` for the evaluated prompt (paper: True at evaluation;
    None: not passed)."""
    student_prompt_format: str | None = None
    """The evaluated prompt's format, 'chat' or 'plain'; None: the run's own
    (`TrainConfig.student_prompt_format`). The paper's protocol: 'chat' (the official
    eval/evaluate_math.py L344 and L358-359 apply the chat template, thinking on)."""
    student_template: str | None = None
    """The evaluated prompt's message template; None: the run's own. The paper's protocol:
    "{question}\n\n{instruction}" (the official eval/evaluate_math.py L340-342)."""
    mode: str = "strict"
    """Headline grading mode: 'strict' (the last boxed answer only, as the official
    evaluator grades) or 'lenient' (also the last number). Both are always computed."""
    batch_size: int = 32
    """Sequences decoded together. The engines differ in what suits them: 'fast' drops rows that
    stopped from its batch, so a large one keeps its matmuls full; 'hf' decodes every row until
    the batch's longest completion ends, so a large one wastes work (bench/eval.py times both
    over a range of sizes; bench/RESULTS.md, section 8). Memory grows with it (the fast
    engine allocates the KV caches of all a batch's rows at their full length)."""
    engine: str = "fast"
    """Sampling engine: 'fast' (opsd_kit's fused decoder, the adapter merged into a copy of the
    weights; a model it does not support samples with generate after a warning) or 'hf'
    (transformers' generate, the reference). Greedy tokens agree up to floating-point ties
    (bench/eval.py measures the match rate)."""
    seed: int = 0
    """Sampling seed (ignored when greedy) and bootstrap seed."""
    n_bootstrap: int = 10_000
    """Bootstrap resamples (over problems) for avg@k intervals, paired differences and ratios."""
    confidence: float = 0.95
    """Coverage of every interval."""

    def validate(self) -> "EvalConfig":
        TrainConfig._check_types(self)  # the same typing rules as the training config
        _check(self.mode in ("strict", "lenient"), "mode", self.mode, "'strict' or 'lenient'")
        _check(self.student_prompt_format in (None, *PROMPT_FORMATS), "student_prompt_format",
               self.student_prompt_format, f"None or one of {list(PROMPT_FORMATS)}")
        if self.student_template is not None:
            error = template_error("student_template", self.student_template)
            if error:
                raise ConfigError(error)
        _check(self.engine in EVAL_ENGINES, "engine", self.engine, f"one of {list(EVAL_ENGINES)}")
        for key in ("k", "max_new_tokens", "batch_size", "n_bootstrap"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        _check(self.size is None or self.size >= 1, "size", self.size, "None or >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 is greedy)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(self.top_k >= 0, "top_k", self.top_k, ">= 0 (0 is off)")
        _check(0 < self.confidence < 1, "confidence", self.confidence, "in (0, 1)")
        if self.temperature == 0 and self.k > 1:
            raise ConfigError(f"k={self.k} with temperature=0: greedy decoding gives k identical samples; "
                              "use k=1, or sample with temperature > 0")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def settings(self):
        """The generation settings of this protocol (n = k samples per problem)."""
        from opsd_kit.rollout.hf import GenerationSettings

        return GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, top_k=self.top_k, n=self.k, batch_size=self.batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EvalConfig":
        """Build and validate; unknown keys are an error that suggests the closest known key."""
        return cls(**_known_keys(cls, values, "evaluation config")).validate()


def lora_error(*, use_lora: bool, teacher: str | None, quantization: str | None,
               teacher_key: str = "teacher") -> str | None:
    """Why weights without a LoRA adapter cannot be trained this way, or None: the one statement
    of these rules (`TrainConfig.validate` raises it before any model loads, `Policy` when built).
    ``teacher``: the teacher the algorithm runs (None: it runs none), set by ``teacher_key``."""
    if use_lora:
        return None
    if teacher == "frozen":
        return (f"{teacher_key}='frozen' needs a LoRA adapter (use_lora=True): the frozen teacher is the base model "
                f"with the adapter switched off. Train an adapter, or choose {teacher_key}='live' explicitly")
    if quantization == "4bit":
        return "quantization='4bit' needs a LoRA adapter (use_lora=True): 4-bit base weights cannot be trained"
    return None


def applies_to(name: str) -> tuple[str, ...]:
    """The algorithms `TrainConfig` field ``name`` applies to."""
    return _FIELDS[name].metadata["applies"]


def resumable_fields(algorithm: str | None = None) -> tuple[str, ...]:
    """The `TrainConfig` keys a resumed run may change: they do not change what is trained. With
    ``algorithm``, also the keys that do not apply to it."""
    return tuple(n for n, f in _FIELDS.items()
                 if f.metadata["resumable"] or (algorithm is not None and algorithm not in f.metadata["applies"]))


def model_fields() -> tuple[str, ...]:
    """The `TrainConfig` keys that fix a policy's weights and adapter layout: runs that agree on
    them can share one loaded model and swap adapters (`opsd_kit.evaluation.study`)."""
    return tuple(n for n, f in _FIELDS.items() if f.metadata["model"])


def field_docs(cls) -> dict[str, str]:
    """``{field: docstring}`` of a config dataclass, read from its source: the string literal
    under a field's annotated assignment (Python keeps no such docstring at runtime)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _known_keys(cls, values: dict, label: str) -> dict:
    """``values`` with lists turned into tuples where the field is a tuple; an unknown key
    raises ConfigError with the closest known key."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {label} key {key!r}{hint}")
    return {k: tuple(v) if isinstance(known[k].default, tuple) and isinstance(v, list) else v
            for k, v in values.items()}


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "None": type(None), "tuple": (tuple, list)}


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be {allowed}")


# ---------------------------------------------------------------------------------------------
# Profiles: named overrides. Algorithm-specific settings follow the paper's baselines.
_PROFILES: dict[str, dict] = {
    # The tiny random model: seconds per run, used by CI. Learns nothing; exercises everything.
    "tiny": dict(model="tiny", train_data="reasoning_gym:chain_sum", train_size=16, max_steps=3,
                 problems_per_step=4, micro_batch_size=2, max_new_tokens=12,
                 max_prompt_tokens=768, lora_r=4, lora_alpha=8, learning_rate=1e-3, max_grad_norm=1.0,
                 num_generations=2, num_iterations=2, save_every=2, generation_batch_size=8,
                 loss_chunk_size=8),
    # The bundled SmolLM2-135M on two-term sums of 1-2 digit numbers, where the privileged
    # teacher is far better than the student (notebook 01 measures the gap). 24 OPSD steps of
    # 8 rollouts with room to finish an answer (96 tokens); GRPO's reward grades boxed answers
    # (strict), the mode the study reports first.
    "cpu-demo": dict(model="smollm2-135m-instruct", train_data="reasoning_gym:chain_sum?max_terms=2&max_digits=2",
                     train_size=256, max_steps=24, problems_per_step=8, micro_batch_size=4, max_new_tokens=96,
                     max_prompt_tokens=512, temperature=0.6, top_p=1.0, top_k=0, lora_r=16, lora_alpha=32,
                     learning_rate=2e-4, max_grad_norm=1.0, grading_mode="strict", num_generations=4,
                     num_iterations=1, save_every=6, keep_checkpoints=10, generation_batch_size=32,
                     loss_chunk_size=64, rollout_backend="fast"),
    # The published OPSD setting for Qwen3-1.7B, in bf16 like the paper's runs. Needs a GPU.
    # Sources: "v3" = arXiv 2601.18734 v3; "1b.sh" = scripts/run_opsd_1b.sh of the official code
    # (github.com/siyan-zhao/OPSD); "kit" = this kit's choice, which changes memory or speed only.
    # docs/algorithm.md tabulates where the paper, the official scripts and this profile differ.
    "paper": dict(
        model="Qwen/Qwen3-1.7B",  # v3 and 1b.sh L7
        dtype="bfloat16", quantization=None,  # 1b.sh L19; v3: bf16, not quantised (4-bit: `paper-qlora`)
        lora_r=64, lora_alpha=128,  # v3; 1b.sh L27-29, on q,k,v,o,gate,up,down (lora_target_modules' default)
        lora_dropout=0.05,  # TRL ModelConfig's default, which every official script inherits (none sets it)
        train_data="siyanzhao/Openthoughts_math_30k_opsd",  # opsd_train.py, grpo_train.py L254: problem, solution
        train_size=29_400,  # v3: about 29.4k rows, i.e. all of them
        problems_per_step=32,  # v3; 1b.sh L3, L9, L11: 8 processes x per-device batch 2 x accumulation 2
        # The official README's re-run (Evaluation Results on AIME24): 47.5% at step 100 (base 47.7%), the
        # best, 51.7%, at step 200. v3 reports 100 steps; 200 holds both, every 25-step checkpoint kept.
        max_steps=200, save_every=25, keep_checkpoints=8,
        learning_rate=2e-4,  # 1b.sh L8, the runnable evidence (the 4B script run_opsd.sh L8 uses 2e-4 too)
        max_grad_norm=1.0,  # TRL's default, which 1b.sh inherits (it sets no max_grad_norm)
        # constant: 1b.sh inherits TRL's linear decay over its 30 epochs (L14, about 27.6k steps), which
        # keeps 99% of the rate through step 200; the kit's linear decay would end at max_steps
        lr_schedule="constant",
        teacher="frozen",  # 1b.sh L34 --fixed_teacher; v3: the initial model, i.e. the adapter switched off
        temperature=1.1,  # v3 and 1b.sh L30
        top_p=0.95, top_k=20,  # v3; 1b.sh L31-32
        max_new_tokens=1024,  # v3 text; v1 and 1b.sh L15 use 2048
        loss_temperature=None,  # v3: teacher and student logits at the rollout temperature
        # v3: forward KL is the default and its ablations favour it; pointwise clipping tau = 0.05 for
        # 1.7B/4B (0.06 for 8B). 1b.sh L21 runs JSD instead: divergence="jsd", jsd_beta=0.5.
        divergence="forward_kl", clip_tau=0.05,
        # The student samples from its untemplated prompt as the published numbers did (the official
        # README's implementation note: opsd_trainer.py L856-864 hands vLLM the chat-templated prompt
        # decoded without special tokens, "user\nProblem: ...\nassistant\n"); the teacher is chat-
        # templated with thinking on (data_collator.py L91-93; v3). student_thinking has no effect on a
        # plain prompt. docs/algorithm.md names what stays different.
        student_prompt_format="plain", student_template=OPSD_SAMPLED_STUDENT_TEMPLATE,
        student_thinking=False, teacher_thinking=True,  # v3: student thinking off, teacher thinking on
        # 1b.sh L20 --max_length 20000: the official room for the teacher prompt's reference solution
        # (a longer one loses the middle of its reasoning, counted in prompt/teacher_middle_cut_total)
        max_prompt_tokens=20_000,
        # kit: memory and speed only; the loss is normalised over the whole step whatever these are
        micro_batch_size=4, generation_batch_size=64, gradient_checkpointing=True,
    ),
}

# Derived profiles: (base profile, changes). A derived profile inherits everything else, the
# base's algorithm overrides and its evaluation protocol included.
_DERIVED: dict[str, tuple[str, dict]] = {
    # `paper` in 4-bit NF4 (QLoRA) for one 24 GB GPU; the frozen teacher is then the 4-bit base model.
    "paper-qlora": ("paper", dict(quantization="4bit")),
}
_PROFILES.update({name: dict(_PROFILES[base], **changes) for name, (base, changes) in _DERIVED.items()})


def _base_profile(name: str) -> str:
    """The profile whose algorithm overrides and evaluation protocol ``name`` uses."""
    return _DERIVED[name][0] if name in _DERIVED else name


def _epochs(epochs: int, rows: int, per_step: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``rows`` problems, ``per_step`` a step (the
    official scripts give epochs; the kit counts steps)."""
    return epochs * -(-rows // per_step)


_PAPER_ROWS = _PROFILES["paper"]["train_size"]

_ALGORITHM_OVERRIDES: dict[str, dict] = {
    "grpo": {
        # The GRPO baseline as the official scripts/run_grpo.sh ("grpo.sh") and grpo_train.py run it.
        "paper": dict(
            learning_rate=2e-5,  # grpo.sh L7
            # 32 rollouts a step = 4 problems x 8 generations: grpo.sh L3 (8 processes) x L8 (per-device 1)
            # x L9 (accumulation 4), TRL's batch counting completions; L20 --num_generations 8
            problems_per_step=4, num_generations=8,
            num_iterations=1,  # TRL GRPOConfig's default; grpo.sh sets none
            temperature=1.2, top_p=1.0, top_k=0,  # grpo.sh L21; top-p and top-k: TRL's defaults (off)
            kl_coef=0.0,  # grpo.sh L27 --beta 0.0
            loss_normalisation="sequence",  # grpo.sh L28 --loss_type grpo: each rollout's token mean
            scale_rewards=True,  # grpo.sh L29 --scale_rewards group
            max_new_tokens=16_000,  # grpo.sh L19
            max_prompt_tokens=2_048,  # grpo.sh L18
            max_steps=_epochs(2, _PAPER_ROWS, 4),  # grpo.sh L13: 2 epochs (the kit counts steps)
            save_every=50, keep_checkpoints=20,  # grpo.sh L26; keep 20: kit, disk (TRL keeps all)
            lr_schedule="linear", max_grad_norm=1.0,  # TRL's defaults, which grpo.sh inherits
            grading_mode="first_box_exact",  # grpo_train.py L47-104: first \boxed{}, stripped lower-case match
            # grpo_train.py L111: a plain-text prompt, which TRL gives the model without a chat template
            student_prompt_format="plain", student_template=GRPO_STUDENT_TEMPLATE,
        ),
        # 4 problems x 4 rollouts a step until a rollout-token budget above OPSD's 24 steps
        # (about 15k tokens): GRPO gets at least OPSD's generated tokens.
        # learning rate: the best of the one-at-a-time sweep from the demo's common start (`make sweep`,
        # docs/results.md); the other settings it tried did no better than the profile's
        "cpu-demo": dict(problems_per_step=4, num_generations=4, max_steps=60, max_generated_tokens=16_000,
                         learning_rate=5e-5),
    },
    "rlsd": {
        # RLSD as the official scripts/run_rlsd_1b.sh ("rlsd.sh"), rlsd_train.py and rlsd_trainer.py run it.
        "paper": dict(
            learning_rate=5e-6, max_grad_norm=0.1,  # rlsd.sh L8, L9
            # 32 rollouts a step = 4 problems x 8 generations: rlsd.sh L3 (4 processes) x L10 (per-device 4)
            # x L12 (accumulation 2); L19 --num_generations 8
            problems_per_step=4, num_generations=8,
            num_iterations=2,  # rlsd.sh L16
            temperature=1.1, top_p=0.95, top_k=20,  # rlsd.sh L20-22
            max_new_tokens=1_024,  # rlsd.sh L18
            max_prompt_tokens=4_096,  # rlsd.sh L41 --teacher_max_prompt_length (the student's: 2048, L17)
            max_steps=_epochs(2, _PAPER_ROWS, 4),  # rlsd.sh L15: 2 epochs (the kit counts steps)
            save_every=25, keep_checkpoints=20,  # rlsd.sh L31; keep 20: kit, disk (TRL keeps all)
            kl_coef=0.0,  # rlsd.sh L35 --beta 0.0
            loss_normalisation="sequence",  # rlsd.sh L36 --loss_type grpo
            scale_rewards=True,  # rlsd.sh L37 --scale_rewards group
            rlsd_lambda=0.5, rlsd_decay_steps=50, rlsd_eps=0.2,  # rlsd.sh L38-40
            rlsd_teacher="live",  # rlsd_trainer.py L103-109: the teacher prompt scored by self.model, adapter on
            lr_schedule="linear",  # TRL's default, which rlsd.sh inherits
            grading_mode="first_box_after_think",  # rlsd_train.py L59-115
            # rlsd_train.py L124-144: both prompts chat-templated, enable_thinking not passed (Qwen3: on)
            student_prompt_format="chat", student_thinking=None, teacher_thinking=None,
            student_template=PROBLEM_STUDENT_TEMPLATE,  # rlsd_train.py L127
            teacher_template=RLSD_TEACHER_TEMPLATE,  # rlsd_train.py L130-141
        ),
    },
    # SFT as the official scripts/run_sft.sh ("sft.sh", one line) and sft_train.py run it.
    "sft": {"paper": dict(
        learning_rate=2e-5, lr_schedule="linear",  # sft.sh --learning_rate 2e-5; TRL's default linear decay
        problems_per_step=64,  # sft.sh: 8 processes x per-device batch 2 x accumulation 4
        max_steps=_epochs(4, _PAPER_ROWS, 64),  # sft.sh --num_train_epochs 4 (the kit counts steps)
        max_target_tokens=16_000,  # sft.sh --max_length 16000 (there: prompt and solution together)
        save_every=100, keep_checkpoints=19,  # sft.sh --save_steps 100: all 19 kept
        # sft_train.py L31: one plain text "Problem: {question}\nSolution: {solution}"
        student_prompt_format="plain", student_template=SFT_STUDENT_TEMPLATE,
    )},
    "opsd": {},
}


def profile_names() -> list[str]:
    return sorted(_PROFILES)


def load_profile(name: str, algorithm: str = "opsd", **overrides) -> TrainConfig:
    """The named profile for ``algorithm``, with ``overrides`` applied, validated. A profile sets a
    field only for the algorithms the field applies to (`applies_to`): the others keep its default."""
    if name not in _PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {profile_names()}")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={algorithm!r} is not allowed; choose one of {list(ALGORITHMS)}")
    profile = dict(_PROFILES[name], **_ALGORITHM_OVERRIDES[algorithm].get(_base_profile(name), {}))
    values = {key: value for key, value in profile.items() if algorithm in applies_to(key)}
    values.update(algorithm=algorithm, profile=name, run_dir=f"runs/{name}-{algorithm}")
    values.update(overrides)
    return TrainConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------
# Evaluation protocols: named EvalConfig overrides.
_EVAL_PROFILES: dict[str, dict] = {
    # Seconds: exercises every path on the tiny random model.
    "tiny": dict(size=None, k=1, temperature=0.0, max_new_tokens=8, n_bootstrap=200),
    # The bundled SmolLM2 on held-out sums: greedy, a cap that lets answers finish, strict
    # (boxed) grading as the headline. The demo holds out 144 problems (leakage-checked).
    "cpu-demo": dict(k=1, temperature=0.0, max_new_tokens=128, mode="strict", batch_size=128),
    # The paper's protocol (v3): AIME24, AIME25 and HMMT25 with thinking on, temperature 1.0, top-p
    # 0.95 (top-k not stated: off), avg@12 (the official README reports avg@16), up to 38,912 new
    # tokens, the last \boxed{} graded strictly. The hub ids are the official eval/evaluate_math.py's
    # (L235 HuggingFaceH4/aime_2024, L238 yentinglin/aime_2025, L241 MathArena/hmmt_feb_2025); its
    # prompt is "{problem}\n\n" + the instruction, chat-templated (L340-344, L358-359).
    "paper": dict(benchmarks=("HuggingFaceH4/aime_2024", "yentinglin/aime_2025", "MathArena/hmmt_feb_2025"),
                  student_thinking=True, temperature=1.0, top_p=0.95, top_k=0, k=12, max_new_tokens=38_912,
                  mode="strict", student_prompt_format="chat", student_template=STUDENT_TEMPLATE),
}


def eval_profile_names() -> list[str]:
    """Every name `load_eval_profile` accepts: the protocols and the derived training profiles."""
    return sorted({*_EVAL_PROFILES, *(n for n in _DERIVED if _base_profile(n) in _EVAL_PROFILES)})


def load_eval_profile(name: str, **overrides) -> EvalConfig:
    """The named evaluation protocol with ``overrides`` applied, validated. A derived training
    profile (`paper-qlora`) names its base's protocol."""
    if name not in eval_profile_names():
        raise ConfigError(f"unknown evaluation profile {name!r}; choose one of {eval_profile_names()}")
    return EvalConfig.from_dict(dict(_EVAL_PROFILES[_base_profile(name)], **overrides))


def eval_protocol_for(config: TrainConfig, **overrides) -> EvalConfig:
    """The evaluation protocol that goes with a training run: the evaluation profile of the
    profile that built ``config`` (a `paper` or `paper-qlora` run -> the paper's protocol,
    thinking on), so that no code changes between training and evaluating."""
    if config.profile is None:
        raise ConfigError(f"profile=None: this config was not built by load_profile, so no evaluation "
                          f"protocol goes with it; choose one with load_eval_profile(name), name one of "
                          f"{eval_profile_names()}")
    return load_eval_profile(config.profile, **overrides)
