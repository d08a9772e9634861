"""Training configuration: one dataclass, a docstring under every field, validated before any
model loads. Profiles (`tiny`, `cpu-demo`, `paper`) are named sets of overrides.

Knob names carry their meaning: `jsd_beta` is only the JSD mixing weight, `kl_coef` only
GRPO's KL penalty, `clip_tau` only OPSD's pointwise clipping, `ratio_clip_eps` only GRPO's
importance-ratio clip.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path

ALGORITHMS = ("opsd", "grpo", "sft")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "topk", "sampled_token")
TEACHERS = ("frozen", "live", "ema")
SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = ("tensorboard", "wandb")


class ConfigError(ValueError):
    """An invalid configuration; raised before any model or data loads."""


@dataclass
class TrainConfig:
    # -- run -------------------------------------------------------------------------------
    algorithm: str = "opsd"
    """Which trainer: 'opsd' (on-policy self-distillation), 'grpo' or 'sft' (baselines)."""
    run_dir: str = "runs/opsd"
    """Folder for metrics.jsonl, checkpoints and the final adapter."""
    seed: int = 0
    """Seeds python, numpy and torch; rollout seeds and problem order derive from it."""
    max_steps: int = 100
    """Optimizer steps (paper: 100 for OPSD, 500 for GRPO)."""
    resume: bool = False
    """Continue from the latest complete checkpoint in run_dir/checkpoints."""

    # -- model -----------------------------------------------------------------------------
    model: str = "smollm2-135m-instruct"
    """'tiny', 'smollm2-135m-instruct' (bundled), a hub id or a local folder."""
    dtype: str = "float32"
    """Weights and compute dtype: 'float32', 'bfloat16' or 'float16'."""
    quantization: str | None = None
    """None or '4bit' (bitsandbytes NF4, double quantisation; QLoRA)."""
    use_lora: bool = True
    """Train a LoRA adapter (required by the frozen teacher); False trains all weights."""
    lora_r: int = 64
    """LoRA rank (paper: 64)."""
    lora_alpha: int = 128
    """LoRA scaling numerator (paper: 128)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Module names that receive LoRA (paper: all attention and MLP projections)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    backend: str = "hf"
    """Model backend: 'hf' (transformers + peft) or 'unsloth' (GPU only, installed separately)."""
    rollout_backend: str = "hf"
    """Rollout engine: 'hf' (generate with KV cache) or 'vllm' (GPU, not with 4-bit)."""

    # -- data and prompts -------------------------------------------------------------------
    train_data: str = "reasoning_gym:chain_sum"
    """Training problems: a source spec understood by opsd_kit.data.load_source, or a file."""
    train_size: int = 512
    """How many training problems to load."""
    max_prompt_tokens: int = 1024
    """Cap on either prompt; over-long teacher prompts lose the end of the reference solution."""
    student_thinking: bool | None = None
    """Chat-template `enable_thinking` for the student (paper: False; None: not passed)."""
    teacher_thinking: bool | None = None
    """Chat-template `enable_thinking` for the teacher (paper: True; None: not passed)."""

    # -- rollouts --------------------------------------------------------------------------
    max_new_tokens: int = 1024
    """Completion cap for training rollouts (paper: 1024)."""
    temperature: float = 1.1
    """Rollout sampling temperature (paper: OPSD 1.1, GRPO 1.2)."""
    top_p: float = 0.95
    """Rollout nucleus truncation (1.0 is off)."""
    top_k: int = 20
    """Rollout top-k truncation (0 is off)."""
    generation_batch_size: int = 16
    """Sequences per generate call."""

    # -- OPSD loss -------------------------------------------------------------------------
    divergence: str = "forward_kl"
    """'forward_kl' KL(p_T||p_S) (paper v3), 'reverse_kl', 'jsd', 'topk' (forward KL over the
    teacher's top-k tokens) or 'sampled_token' (policy-gradient form)."""
    jsd_beta: float = 0.5
    """JSD mixing weight beta in M = beta p_T + (1 - beta) p_S; used only when divergence='jsd'."""
    clip_tau: float | None = None
    """Pointwise clipping: each vocabulary entry's contribution is min(l_v, tau) (paper v3: 0.05)."""
    loss_temperature: float | None = None
    """Temperature dividing both logits in the loss; None uses the rollout temperature (paper)."""
    loss_support: str = "full"
    """'full': the loss uses the untruncated distributions; 'truncated': both are restricted to
    the rollout's top-k/top-p support of the student (docs/algorithm.md, Pitfalls, 5)."""
    distill_topk: int = 20
    """k for divergence='topk'."""
    sampled_token_clamp: float | None = 5.0
    """Advantage clamp for divergence='sampled_token' (rLLM: 5)."""
    teacher: str = "frozen"
    """'frozen' (base model, adapter off; paper), 'live' (current weights) or 'ema'."""
    ema_decay: float = 0.999
    """EMA decay of the LoRA weights for teacher='ema'."""
    loss_chunk_size: int = 128
    """Sequence positions per chunk of the divergence; bounds the logits held at once."""

    # -- GRPO ------------------------------------------------------------------------------
    num_generations: int = 8
    """GRPO group size G: rollouts per problem (paper: 8)."""
    num_iterations: int = 2
    """GRPO optimizer steps per batch of rollouts (paper: 2)."""
    ratio_clip_eps: float = 0.2
    """GRPO importance-ratio clip epsilon."""
    scale_rewards: bool = True
    """GRPO: divide group-centred rewards by the group's standard deviation."""
    kl_coef: float = 0.0
    """GRPO KL penalty to the reference (adapter-off) model; 0 as in the paper."""
    grading_mode: str = "strict"
    """Reward and rollout-correctness grading: 'strict' (the last boxed answer only) or 'lenient'
    (also '####', 'the answer is', else the last number); see opsd_kit.evaluate."""

    # -- optimisation ----------------------------------------------------------------------
    learning_rate: float = 5e-6
    """AdamW learning rate (paper: 5e-6)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 0.1
    """Gradient clipping norm (paper: 0.1)."""
    lr_schedule: str = "constant"
    """'constant', 'linear' or 'cosine' decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    problems_per_step: int = 32
    """Problems in one optimizer step, over all processes (paper: 32)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward; the step accumulates gradients over micro-batches."""
    max_nonfinite_steps: int = 3
    """Non-finite loss or gradient: skip the step; this many in a row stops the run."""

    # -- logging and checkpoints -----------------------------------------------------------
    save_every: int = 25
    """Checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep."""
    trackers: tuple = ()
    """Extra metric sinks: 'tensorboard', 'wandb'. metrics.jsonl is always written."""
    progress: bool = True
    """Show a tqdm progress bar."""

    # ---------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the key and the allowed values; return self."""
        self._check_types()
        choices = {
            "algorithm": ALGORITHMS, "divergence": DIVERGENCES, "teacher": TEACHERS,
            "lr_schedule": SCHEDULES, "dtype": ("float32", "bfloat16", "float16"),
            "quantization": (None, "4bit"), "backend": ("hf", "unsloth"),
            "rollout_backend": ("hf", "vllm"), "loss_support": ("full", "truncated"),
            "grading_mode": ("strict", "lenient"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not allowed; choose one of {list(allowed)}")
        for t in self.trackers:
            if t not in TRACKERS:
                raise ConfigError(f"trackers contains {t!r}; allowed: {list(TRACKERS)}")
        positive = ("max_steps", "train_size", "max_prompt_tokens", "max_new_tokens", "generation_batch_size",
                    "problems_per_step", "micro_batch_size", "num_generations", "num_iterations",
                    "loss_chunk_size", "save_every", "keep_checkpoints", "lora_r", "lora_alpha",
                    "max_nonfinite_steps", "distill_topk")
        for key in positive:
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        _check(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", self.jsd_beta, "in [0, 1]")
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
        if self.sampled_token_clamp is not None:
            _check(self.sampled_token_clamp > 0, "sampled_token_clamp", self.sampled_token_clamp, "None or > 0")
        if self.teacher == "frozen" and not self.use_lora and self.algorithm == "opsd":
            raise ConfigError("teacher='frozen' needs use_lora=True: the frozen teacher is the base model with "
                              "the adapter switched off. Set use_lora=True, or choose teacher='live' explicitly")
        if self.quantization == "4bit" and not self.use_lora:
            raise ConfigError("quantization='4bit' needs use_lora=True: 4-bit base weights cannot be trained")
        if self.rollout_backend == "vllm" and self.quantization is not None:
            raise ConfigError("rollout_backend='vllm' cannot be combined with quantization='4bit' (vLLM cannot "
                              "serve bitsandbytes QLoRA; TRL #3654, unsloth #1930): use rollout_backend='hf' "
                              "or quantization=None")
        if self.loss_support == "truncated" and self.divergence in ("topk", "sampled_token"):
            raise ConfigError(f"loss_support='truncated' applies to full-vocabulary divergences; divergence="
                              f"{self.divergence!r} has its own support: use loss_support='full'")
        if self.algorithm == "grpo" and self.num_generations < 2:
            raise ConfigError("num_generations must be >= 2 for grpo (group-relative advantages need a group)")
        if self.algorithm == "opsd" and self.kl_coef:
            raise ConfigError("kl_coef is GRPO's KL penalty; it has no meaning for algorithm='opsd'")
        return self

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

    def check_world(self, world_size: int) -> int:
        """Problems each process handles per step; raise if the batch does not divide."""
        if self.problems_per_step % world_size:
            raise ConfigError(f"problems_per_step={self.problems_per_step} does not divide over "
                              f"{world_size} processes; it must be a multiple of {world_size}")
        return self.problems_per_step // world_size

    def check_context(self, context_length: int | None, source: str = "the model config") -> None:
        """The longest sequence a step builds (a prompt of max_prompt_tokens followed by a
        completion of max_new_tokens) must fit the model's context; ``None`` skips the check."""
        total = self.max_prompt_tokens + self.max_new_tokens
        if context_length is not None and total > context_length:
            raise ConfigError(
                f"max_prompt_tokens={self.max_prompt_tokens} + max_new_tokens={self.max_new_tokens} = {total} "
                f"exceeds the model's context of {context_length} tokens ({source}); lower them so that "
                f"max_prompt_tokens + max_new_tokens <= {context_length}")

    def rollout_settings(self, n: int = 1, max_new_tokens: int | None = None):
        """The rollout sampling settings, with ``n`` samples per prompt."""
        from .rollout import GenerationSettings

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


@dataclass
class EvalConfig:
    """How held-out accuracy is measured, separate from how a run trains: which problems,
    how the student decodes, how many samples, how answers are graded, and how intervals are
    drawn. Profiles (`load_eval_profile`) name the protocols: `tiny`, `cpu-demo`, `paper`."""

    data: str = ""
    """Held-out source: a spec for `opsd_kit.data.load_source` or a file; "" means the caller
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
    mode: str = "strict"
    """Headline grading mode: 'strict' (the last boxed answer only, as the official
    evaluator grades) or 'lenient' (also the last number). Both are always computed."""
    batch_size: int = 32
    """Sequences per generate call."""
    seed: int = 0
    """Sampling seed (ignored when greedy) and bootstrap seed."""
    n_bootstrap: int = 10_000
    """Bootstrap resamples (over problems) for avg@k intervals, paired differences and ratios."""
    confidence: float = 0.95
    """Coverage of every interval."""

    def validate(self) -> "EvalConfig":
        TrainConfig._check_types(self)  # the same typing rules as the training config
        _check(self.mode in ("strict", "lenient"), "mode", self.mode, "'strict' or 'lenient'")
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
        from .rollout import GenerationSettings

        return GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, top_k=self.top_k, n=self.k, batch_size=self.batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EvalConfig":
        """Build and validate; unknown keys are an error that suggests the closest known key."""
        return cls(**_known_keys(cls, values, "evaluation config")).validate()


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
    # teacher is far better than the student (measured: lenient accuracy 50% vs 6% at
    # temperature 0.6; notebook 01 re-measures the gap). A few minutes a run on 2 CPU cores.
    "cpu-demo": dict(model="smollm2-135m-instruct", train_data="reasoning_gym:chain_sum?max_terms=2&max_digits=2",
                     train_size=256, max_steps=12, problems_per_step=8, micro_batch_size=4, max_new_tokens=64,
                     max_prompt_tokens=512, temperature=0.6, top_p=1.0, top_k=0, lora_r=16, lora_alpha=32,
                     learning_rate=2e-4, max_grad_norm=1.0, grading_mode="lenient", num_generations=4,
                     num_iterations=1, save_every=4, keep_checkpoints=10, generation_batch_size=32,
                     loss_chunk_size=64),
    # The paper's v3 settings (Qwen3-1.7B, QLoRA 4-bit). Needs a GPU.
    "paper": dict(model="Qwen/Qwen3-1.7B", dtype="bfloat16", quantization="4bit",
                  train_data="siyanzhao/Openthoughts_math_30k_opsd", train_size=29_400, max_steps=100,
                  problems_per_step=32, micro_batch_size=4, max_new_tokens=1024, max_prompt_tokens=4096,
                  temperature=1.1, top_p=0.95,
                  top_k=20, lora_r=64, lora_alpha=128, learning_rate=5e-6, max_grad_norm=0.1,
                  divergence="forward_kl", clip_tau=0.05, teacher="frozen", student_thinking=False,
                  teacher_thinking=True, gradient_checkpointing=True, save_every=25, generation_batch_size=64),
}

_ALGORITHM_OVERRIDES: dict[str, dict] = {
    # GRPO baseline (paper): 8 generations, temperature 1.2, KL 0, 2 iterations, 500 steps.
    "grpo": {"paper": dict(temperature=1.2, num_generations=8, num_iterations=2, max_steps=500,
                           max_new_tokens=16_384, kl_coef=0.0, problems_per_step=32),
             # 4 problems x 4 rollouts: twice OPSD's rollouts per step, so the CPU demo fits its budget.
             "cpu-demo": dict(problems_per_step=4, num_generations=4)},
    # SFT baseline: (problem -> reference solution), same LoRA and learning rate.
    "sft": {},
    "opsd": {},
}


def profile_names() -> list[str]:
    return sorted(_PROFILES)


def load_profile(name: str, algorithm: str = "opsd", **overrides) -> TrainConfig:
    """The named profile for ``algorithm``, with ``overrides`` applied, validated."""
    if name not in _PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {profile_names()}")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={algorithm!r} is not allowed; choose one of {list(ALGORITHMS)}")
    values = dict(_PROFILES[name], algorithm=algorithm, run_dir=f"runs/{name}-{algorithm}")
    values.update(_ALGORITHM_OVERRIDES[algorithm].get(name, {}))
    values.update(overrides)
    return TrainConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------
# Evaluation protocols: named EvalConfig overrides.
_EVAL_PROFILES: dict[str, dict] = {
    # Seconds: exercises every path on the tiny random model.
    "tiny": dict(size=None, k=1, temperature=0.0, max_new_tokens=8, n_bootstrap=200),
    # The bundled SmolLM2 on held-out sums: greedy, a cap that lets answers finish, strict
    # (boxed) grading as the headline. The demo holds out 160 problems (leakage-checked).
    "cpu-demo": dict(k=1, temperature=0.0, max_new_tokens=128, mode="strict", batch_size=32),
}


def eval_profile_names() -> list[str]:
    return sorted(_EVAL_PROFILES)


def load_eval_profile(name: str, **overrides) -> EvalConfig:
    """The named evaluation protocol with ``overrides`` applied, validated."""
    if name not in _EVAL_PROFILES:
        raise ConfigError(f"unknown evaluation profile {name!r}; choose one of {eval_profile_names()}")
    return EvalConfig.from_dict(dict(_EVAL_PROFILES[name], **overrides))
