"""Training configuration: one dataclass, a docstring under every field, validated before any
model loads. Profiles (`tiny`, `cpu-demo`, `paper`, `paper-qlora`) are named sets of overrides;
`eval_protocol_for` gives the evaluation protocol that goes with a run's profile.

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

from opsd_kit.prompts import INSTRUCTION, STUDENT_TEMPLATE, TEACHER_TEMPLATE, template_error

ALGORITHMS = ("opsd", "grpo", "sft", "rlsd")
GROUP_ALGORITHMS = ("grpo", "rlsd")  # sample num_generations rollouts per problem, group-relative advantages
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "topk", "sampled_token", "hint_contrast")
TEACHER_HINTS = ("reference", "shuffled")
TEACHERS = ("frozen", "live", "ema")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "4bit")
BACKENDS = ("hf", "unsloth")
ROLLOUT_BACKENDS = ("hf", "fast", "vllm")
EVAL_ENGINES = ("fast", "hf")  # evaluation's sampling engines (`EvalConfig.engine`)
SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = ("tensorboard", "wandb")


class ConfigError(ValueError):
    """An invalid configuration; raised before any model or data loads."""


@dataclass
class TrainConfig:
    # -- run -------------------------------------------------------------------------------
    algorithm: str = "opsd"
    """Which trainer: 'opsd' (on-policy self-distillation), 'grpo' or 'sft' (baselines), or
    'rlsd' (GRPO with the privileged teacher's token-level credit, `opsd_kit.algorithms.rlsd`)."""
    profile: str | None = None
    """Which profile built this config (set by `load_profile`; None: built by hand). It picks
    the evaluation protocol that goes with the run (`eval_protocol_for`)."""
    run_dir: str = "runs/opsd"
    """Folder for metrics.jsonl, checkpoints and the final adapter."""
    seed: int = 0
    """Seeds python, numpy and torch; rollout seeds and problem order derive from it."""
    max_steps: int = 100
    """Optimizer steps (paper: 100 for OPSD, 500 for GRPO)."""
    max_generated_tokens: int | None = None
    """Rollout-token budget: stop after the step at which the run's generated tokens (all
    processes) reach it, even before max_steps. None: no budget. A token-matched comparison
    gives each method the same budget."""
    resume: bool | None = None
    """None = resume when run_dir holds checkpoints of the same config (else start fresh; another
    config is refused), True = require a checkpoint to resume from (error if none), False = start
    fresh, which needs overwrite=True when checkpoints exist. "The same config" ignores the keys
    that do not change what is trained (`opsd_kit.run.rundir.RESUMABLE_CHANGES`)."""
    overwrite: bool = False
    """Allow a fresh run to delete run_dir's checkpoints and final adapter (resume=False, or
    resume=None with checkpoints of another config). Nothing is ever deleted without it."""

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
    """Rollout engine: 'hf' (transformers' generate, the reference), 'fast' (opsd_kit's fused
    decoder: the LoRA adapter merged into a copy of the weights before each rollout, fused
    projections, a static KV cache; Llama/Qwen layouts, else generate with the adapter merged;
    not with 4-bit; bench/rollout.py) or 'vllm' (GPU, not with 4-bit)."""
    share_prompt_pass: bool = True
    """OPSD with rollout_backend='fast': the student's forward over the prompts runs once, before
    sampling, and serves the rollout and the loss (one prompt forward less per step; docs/algorithm.md,
    The algorithm). It holds every micro-batch's prompt activations from sampling until that
    micro-batch's backward; False runs them one micro-batch at a time (less memory with many
    micro-batches). Off by itself with dropout, gradient checkpointing or the EMA teacher."""

    # -- data and prompts -------------------------------------------------------------------
    train_data: str = "reasoning_gym:chain_sum"
    """Training problems: a source spec understood by opsd_kit.data.sources.load_source, or a file."""
    train_size: int = 512
    """How many training problems to load."""
    max_prompt_tokens: int = 1024
    """Cap on either prompt; over-long teacher prompts lose the end of the reference solution."""
    student_thinking: bool | None = None
    """Chat-template `enable_thinking` for the student (paper: False; None: not passed)."""
    teacher_thinking: bool | None = None
    """Chat-template `enable_thinking` for the teacher (paper: True; None: not passed)."""
    student_template: str = STUDENT_TEMPLATE
    """The student's message, a `str.format` template: `{question}` (required) and `{instruction}`."""
    teacher_template: str = TEACHER_TEMPLATE
    """The teacher's message. The default follows the paper's teacher prompt: the problem, a line
    announcing a reference solution, the solution between begin/end markers, a transition asking
    the model to understand it and solve the problem again in its own words, then the
    instruction. `{question}` and `{solution}` are required, `{instruction}` optional; literal
    braces are written `{{` `}}`."""
    instruction: str = INSTRUCTION
    """The answer-format instruction both prompts end with (inserted as `{instruction}`)."""
    teacher_hint: str = "reference"
    """The solution in the teacher's prompt: 'reference' (the problem's own verified solution:
    OPSD) or 'shuffled' (another training problem's, with a different answer where possible; a
    control run: the divergence left under a wrong hint is style, not task content). The
    shuffled assignment (`prompts.shuffled_hints`) is fixed by the seed for the whole run."""

    # -- rollouts --------------------------------------------------------------------------
    max_new_tokens: int = 1024
    """Completion cap for training rollouts (paper v3: 1024). SFT generates nothing: its
    targets are capped by `max_target_tokens` instead."""
    max_target_tokens: int | None = None
    """SFT target cap: reference solutions longer than this many tokens (EOS included) are cut;
    None = no cap (every target must then fit the model's context after its prompt). Used by
    SFT only (`paper` profile: 16384, the official SFT script's max length)."""
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
    teacher's top-k tokens), 'sampled_token' (policy-gradient form) or 'hint_contrast': KL(r || p_S)
    with r = sg(p_S) (c / w)^contrast_alpha normalised, c the teacher with the correct hint and w with a
    shuffled one (`losses.hint_contrast_divergence`): what the correct hint adds over the style
    both teachers share. It costs a third forward pass (the wrong-hint teacher)."""
    jsd_beta: float = 0.5
    """JSD mixing weight beta in M = beta p_T + (1 - beta) p_S; used only when divergence='jsd'."""
    clip_tau: float | None = None
    """Pointwise clipping: each vocabulary entry's contribution is min(l_v, tau) (paper v3: 0.05);
    for 'hint_contrast' the entries r_v (log r_v - log p_S(v))."""
    contrast_alpha: float = 1.0
    """Strength alpha of the contrast in divergence='hint_contrast' (> 0): r = sg(p_S) (c / w)^alpha normalised."""
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
    (also '####', 'the answer is', else the last number); see opsd_kit.evaluation.evaluate."""

    # -- RLSD ------------------------------------------------------------------------------
    rlsd_lambda: float = 0.5
    """RLSD: initial mixing weight lambda_0 of the teacher's token weights in
    A_t = A ((1 - lambda) + lambda w_t); decays linearly to 0 (official rlsd_trainer.py: 0.5)."""
    rlsd_eps: float = 0.2
    """RLSD: token weights are clipped to [1 - eps, 1 + eps] (official rlsd_trainer.py: 0.2)."""
    rlsd_decay_steps: int = 50
    """RLSD: optimizer steps over which lambda decays linearly from rlsd_lambda to 0 (official
    rlsd_trainer.py: 50); from then on RLSD is plain GRPO."""

    # -- optimisation ----------------------------------------------------------------------
    learning_rate: float = 2e-4
    """AdamW learning rate (the `paper` profile: 2e-4, as the official Qwen3-1.7B launch script
    scripts/run_opsd_1b.sh)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (1.0: TRL's default, which the official launch scripts inherit)."""
    lr_schedule: str = "constant"
    """'constant', 'linear' or 'cosine' decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps: the learning rate factor is step / warmup_steps from step 0 (the
    `transformers.get_scheduler` convention; 0 at the first step), then the schedule."""
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
            "lr_schedule": SCHEDULES, "dtype": DTYPES, "quantization": QUANTIZATIONS, "backend": BACKENDS,
            "rollout_backend": ROLLOUT_BACKENDS, "loss_support": ("full", "truncated"),
            "grading_mode": ("strict", "lenient"), "profile": (None, *_PROFILES),
            "teacher_hint": TEACHER_HINTS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not allowed; choose one of {list(allowed)}")
        for t in self.trackers:
            if t not in TRACKERS:
                raise ConfigError(f"trackers contains {t!r}; allowed: {list(TRACKERS)}")
        _check(self.max_generated_tokens is None or self.max_generated_tokens >= 1, "max_generated_tokens",
               self.max_generated_tokens, "None or an integer >= 1")
        positive = ("max_steps", "train_size", "max_prompt_tokens", "max_new_tokens", "generation_batch_size",
                    "problems_per_step", "micro_batch_size", "num_generations", "num_iterations",
                    "loss_chunk_size", "save_every", "keep_checkpoints", "lora_r", "lora_alpha",
                    "max_nonfinite_steps", "distill_topk", "rlsd_decay_steps")
        for key in positive:
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        for key in ("student_template", "teacher_template"):
            error = template_error(key, getattr(self, key))
            if error:
                raise ConfigError(error)
        _check(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", self.jsd_beta, "in [0, 1]")
        _check(self.contrast_alpha > 0, "contrast_alpha", self.contrast_alpha, "> 0")
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
        _check(0 <= self.rlsd_lambda <= 1, "rlsd_lambda", self.rlsd_lambda, "in [0, 1]")
        _check(0 <= self.rlsd_eps < 1, "rlsd_eps", self.rlsd_eps, "in [0, 1) (weights stay positive)")
        if self.sampled_token_clamp is not None:
            _check(self.sampled_token_clamp > 0, "sampled_token_clamp", self.sampled_token_clamp, "None or > 0")
        if self.teacher == "frozen" and not self.use_lora and self.uses_teacher:
            raise ConfigError("teacher='frozen' needs use_lora=True: the frozen teacher is the base model with "
                              "the adapter switched off. Set use_lora=True, or choose teacher='live' explicitly")
        if self.quantization == "4bit" and not self.use_lora:
            raise ConfigError("quantization='4bit' needs use_lora=True: 4-bit base weights cannot be trained")
        if self.rollout_backend == "vllm" and self.quantization is not None:
            raise ConfigError("rollout_backend='vllm' cannot be combined with quantization='4bit' (vLLM cannot "
                              "serve bitsandbytes QLoRA; TRL #3654, unsloth #1930): use rollout_backend='hf' "
                              "or quantization=None")
        if self.rollout_backend == "fast" and self.quantization is not None:
            raise ConfigError("rollout_backend='fast' cannot be combined with quantization='4bit': merging LoRA into "
                              "4-bit base weights is not exact; use rollout_backend='hf' or quantization=None")
        if self.rollout_backend == "fast" and not self.use_lora:
            raise ConfigError("rollout_backend='fast' merges the LoRA adapter while sampling and needs "
                              "use_lora=True; use rollout_backend='hf'")
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
        if self.teacher_hint != "reference" and self.algorithm != "opsd":
            raise ConfigError(f"teacher_hint={self.teacher_hint!r} changes OPSD's teacher prompt; algorithm="
                              f"{self.algorithm!r} has none: use teacher_hint='reference'")
        if self.resume and self.overwrite:
            raise ConfigError("resume=True continues run_dir's checkpoints; overwrite=True deletes them: set one "
                              "of them (overwrite=True with resume=False starts over)")
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
    def uses_teacher(self) -> bool:
        """Whether the algorithm runs the privileged teacher (OPSD's targets, RLSD's token credit)."""
        return self.algorithm in ("opsd", "rlsd")

    def check_context(self, context_length: int | None, source: str = "the model config") -> None:
        """The longest sequence a step builds (a prompt of max_prompt_tokens followed by a
        completion of max_new_tokens, or for SFT a target of max_target_tokens) must fit the
        model's context; ``None`` skips the check. SFT without a target cap checks the prompt
        here and each target once tokenised (`opsd_kit.algorithms.sft`)."""
        key = "max_target_tokens" if self.algorithm == "sft" else "max_new_tokens"
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
    mode: str = "strict"
    """Headline grading mode: 'strict' (the last boxed answer only, as the official
    evaluator grades) or 'lenient' (also the last number). Both are always computed."""
    batch_size: int = 32
    """Sequences per generate call."""
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
    # (strict), the mode the study reports first. About 15 minutes a run on one CPU core.
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
        model="Qwen/Qwen3-1.7B",  # v3 and 1b.sh
        dtype="bfloat16", quantization=None,  # v3: bf16, not quantised (4-bit: the `paper-qlora` profile)
        lora_r=64, lora_alpha=128,  # v3; on q,k,v,o,gate,up,down (lora_target_modules' default)
        train_data="siyanzhao/Openthoughts_math_30k_opsd",  # the official code's data: problem, solution
        train_size=29_400,  # v3: about 29.4k rows, i.e. all of them
        problems_per_step=32,  # v3; 1b.sh: 8 GPUs x per-device batch 2 x gradient accumulation 2
        max_steps=100,  # v3: 100 optimizer steps
        save_every=25, keep_checkpoints=4,  # v3 reports the best of the checkpoints every 25 steps: keep all 4
        learning_rate=2e-4,  # 1b.sh, the runnable evidence (the 4B script run_opsd.sh uses 2e-5)
        max_grad_norm=1.0,  # TRL's default, which 1b.sh inherits (it sets no max_grad_norm)
        teacher="frozen",  # v3: the initial model, i.e. the adapter switched off
        temperature=1.1,  # v3 and 1b.sh
        top_p=0.95, top_k=20,  # v3
        max_new_tokens=1024,  # v3 text; v1 and 1b.sh use 2048
        loss_temperature=None,  # v3: teacher and student logits at the rollout temperature
        # v3: forward KL is the default and its ablations favour it; pointwise clipping tau = 0.05 for
        # 1.7B/4B (0.06 for 8B). 1b.sh runs JSD instead: divergence="jsd", jsd_beta=0.5.
        divergence="forward_kl", clip_tau=0.05,
        student_thinking=False, teacher_thinking=True,  # v3: student thinking off, teacher thinking on
        # kit: room for the teacher prompt's reference solution (longer ones are shortened and counted
        # in prompt/teacher_truncated_total)
        max_prompt_tokens=4096,
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


_ALGORITHM_OVERRIDES: dict[str, dict] = {
    "grpo": {
        # The GRPO baseline as the official scripts/run_grpo.sh and v3 describe it.
        "paper": dict(
            num_generations=8, temperature=1.2, kl_coef=0.0, num_iterations=2,  # run_grpo.sh, v3
            scale_rewards=True, grading_mode="strict",  # group-scaled advantages; binary math_verify reward
            max_steps=500, keep_checkpoints=20,  # v3: 500 steps, peak reported: keep every 25-step checkpoint
            max_new_tokens=16_384,  # the official README's token comparison: GRPO rollouts of up to 16k tokens
            learning_rate=1e-6,  # TRL GRPOConfig's default; not known here: check it against run_grpo.sh
            problems_per_step=32,  # as OPSD; check against run_grpo.sh
        ),
        # 4 problems x 4 rollouts a step until a rollout-token budget above OPSD's 24 steps
        # (about 15k tokens): GRPO gets at least OPSD's generated tokens.
        "cpu-demo": dict(problems_per_step=4, num_generations=4, max_steps=60, max_generated_tokens=16_000),
    },
    # SFT baseline as scripts/run_sft.sh: (problem -> reference solution) with the profile's LoRA 64/128.
    # Its learning rate and step count are not known here: the profile's, to be checked against run_sft.sh.
    "sft": {"paper": dict(max_target_tokens=16_384)},  # run_sft.sh's max length: targets are not cut at 1024
    "opsd": {},
}
# RLSD is GRPO with the teacher's token-level credit: the same rollouts, group size and schedule.
_ALGORITHM_OVERRIDES["rlsd"] = _ALGORITHM_OVERRIDES["grpo"]


def profile_names() -> list[str]:
    return sorted(_PROFILES)


def load_profile(name: str, algorithm: str = "opsd", **overrides) -> TrainConfig:
    """The named profile for ``algorithm``, with ``overrides`` applied, validated."""
    if name not in _PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {profile_names()}")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={algorithm!r} is not allowed; choose one of {list(ALGORITHMS)}")
    values = dict(_PROFILES[name], algorithm=algorithm, profile=name, run_dir=f"runs/{name}-{algorithm}")
    values.update(_ALGORITHM_OVERRIDES[algorithm].get(_base_profile(name), {}))
    values.update(overrides)
    return TrainConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------
# Evaluation protocols: named EvalConfig overrides.
_EVAL_PROFILES: dict[str, dict] = {
    # Seconds: exercises every path on the tiny random model.
    "tiny": dict(size=None, k=1, temperature=0.0, max_new_tokens=8, n_bootstrap=200),
    # The bundled SmolLM2 on held-out sums: greedy, a cap that lets answers finish, strict
    # (boxed) grading as the headline. The demo holds out 144 problems (leakage-checked).
    "cpu-demo": dict(k=1, temperature=0.0, max_new_tokens=128, mode="strict", batch_size=48),
    # The paper's protocol (v3): AIME24, AIME25 and HMMT25 with thinking on, temperature 1.0, top-p
    # 0.95 (top-k not stated: off), avg@12 (the official README reports avg@16), up to 38,912 new
    # tokens, the last \boxed{} graded strictly. The hub ids are well-known public copies of the
    # three benchmarks, not checked against the official evaluation code: check them there.
    "paper": dict(benchmarks=("HuggingFaceH4/aime_2024", "math-ai/aime25", "MathArena/hmmt_feb_2025"),
                  student_thinking=True, temperature=1.0, top_p=0.95, top_k=0, k=12, max_new_tokens=38_912,
                  mode="strict"),
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
