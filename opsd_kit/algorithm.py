"""What OPSD, GRPO and SFT share inside a step: cached prompt ids, rollouts booked in the
ledger, contiguous batches, and final hidden states (logits are never materialised here; the
losses go through the output head in chunks)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MicroBatch:
    """One forward/backward worth of rows. ``tensors`` holds algorithm-specific data."""

    student: "object"  # prompts.Batch: [student prompt ++ completion]
    num_loss_tokens: int
    teacher: "object" = None  # prompts.Batch: [teacher prompt ++ same completion] (OPSD)
    wrong_teacher: "object" = None  # prompts.Batch: [wrong-hint teacher prompt ++ same completion] (hint_contrast)
    tensors: dict = field(default_factory=dict)

    ROLES = ("student", "teacher", "wrong_teacher")

    def state_dict(self) -> dict:
        """Tensors and plain containers only (checkpoints load with ``weights_only=True``)."""
        roles = {r: None if getattr(self, r) is None else vars(getattr(self, r)).copy() for r in self.ROLES}
        return {**roles, "num_loss_tokens": self.num_loss_tokens, "tensors": dict(self.tensors)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MicroBatch":
        from .prompts import Batch

        roles = {r: None if state[r] is None else Batch(**state[r]) for r in cls.ROLES}
        return cls(num_loss_tokens=state["num_loss_tokens"], tensors=dict(state["tensors"]), **roles)


class Algorithm:
    """Base class. Subclasses implement ``prepare(step)`` and ``loss(micro_batch)``."""

    def __init__(self, trainer):
        from .prompts import build_prompts

        self.trainer = trainer
        self.config = trainer.config
        self.policy = trainer.policy
        self.tokenizer = trainer.policy.tokenizer
        self.builder = build_prompts(self.config, self.tokenizer)
        self._student_ids: dict[str, list[int]] = {}
        self._teacher_ids: dict[str, list[int]] = {}
        self._wrong_teacher_ids: dict[str, list[int]] = {}
        wrong = trainer.shuffled_hints  # problem id -> another problem's solution, or None
        for p in trainer.problems:  # tokenise once, and fail on over-long prompts before training
            self._student_ids[p.id] = self.builder.student_ids(p)
            if self.uses_teacher_prompt:
                hint = wrong[p.id] if self.config.teacher_hint == "shuffled" else None
                self._teacher_ids[p.id] = self.builder.teacher_ids(p, hint)
                if self.config.divergence == "hint_contrast":
                    self._wrong_teacher_ids[p.id] = self.builder.teacher_ids(p, wrong[p.id])

    uses_teacher_prompt = False

    # -- subclass API --------------------------------------------------------------------
    def prepare(self, step: int) -> tuple[list[MicroBatch], dict]:
        raise NotImplementedError

    def loss(self, mb: MicroBatch):
        """Return ``(loss_sum, metrics)``: the SUM of per-token losses of the micro-batch."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- shared helpers ------------------------------------------------------------------
    def student_prompt(self, problem) -> list[int]:
        return self._student_ids[problem.id]

    def teacher_prompt(self, problem) -> list[int]:
        return self._teacher_ids[problem.id]

    def wrong_teacher_prompt(self, problem) -> list[int]:
        """The teacher prompt with the problem's shuffled (wrong) hint (divergence='hint_contrast')."""
        return self._wrong_teacher_ids[problem.id]

    def rollouts(self, problems, step: int, n: int):
        """Sample ``n`` completions per problem from the current student; book the tokens."""
        from .rollout import generate

        cfg, tr = self.config, self.trainer
        settings = cfg.rollout_settings(n=n)
        prompts = [self.student_prompt(p) for p in problems]
        seed = (cfg.seed * 1_000_003 + step) * tr.accelerator.num_processes + tr.accelerator.process_index
        with tr.phase("generate"):
            if cfg.rollout_backend == "vllm":
                out = self._vllm().generate(self.policy, prompts, settings, seed=seed,
                                            adapter_dir=str(tr.run_dir / "vllm_adapter"))
            elif cfg.rollout_backend == "fast":
                out = self._fast().generate(prompts, settings, seed=seed)
            else:
                out = generate(self.policy.model, self.tokenizer, prompts, settings, seed=seed)
        tr.ledger.generated_tokens += int(tr.reduce_sum(out.num_generated_tokens))
        tr.ledger.rollouts += int(tr.reduce_sum(len(out)))
        return out

    def _fast(self):
        if getattr(self, "_fast_engine", None) is None:
            from .rollout import FastEngine

            self._fast_engine = FastEngine(self.policy.model, self.tokenizer)
        return self._fast_engine

    def _vllm(self):
        if getattr(self, "_vllm_engine", None) is None:
            from .rollout import VLLMEngine

            cfg = self.config
            self._vllm_engine = VLLMEngine(cfg.model, quantization=cfg.quantization, dtype=cfg.dtype,
                                           max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
                                           max_lora_rank=cfg.lora_r)
        return self._vllm_engine

    def grade(self, rollouts, problems) -> list[float]:
        """1.0 where a rollout's answer, read in ``config.grading_mode`` ("strict": its last box only),
        matches the problem's answer, else 0.0 (the GRPO reward and ``rollout/correct``)."""
        from .evaluate import grade_many

        golds = [problems[i].answer for i in rollouts.prompt_index]
        return [float(c) for c in grade_many(rollouts.texts, golds, mode=self.config.grading_mode)]

    def rollout_metrics(self, rollouts, correct: list[float]) -> dict:
        lengths = [len(c) for c in rollouts.completion_ids]
        return {
            "rollout/correct": sum(correct) / max(1, len(correct)),
            "rollout/len_mean": sum(lengths) / max(1, len(lengths)),
            "rollout/len_max": max(lengths, default=0),
            "rollout/truncated_rate": 1.0 - sum(rollouts.finished) / max(1, len(rollouts)),
            "tokens/generated": rollouts.num_generated_tokens,
        }

    def chunks(self, n: int):
        """Index ranges of micro-batches over n rows."""
        size = self.config.micro_batch_size
        return [range(s, min(n, s + size)) for s in range(0, n, size)]

    def hidden(self, batch):
        """Final hidden states at the columns that predict the completion: [B, C, H]."""
        device = self.trainer.accelerator.device
        b = batch.to(device)
        h = self.policy.backbone_hidden(b.input_ids, b.attention_mask, b.position_ids)
        return h[:, b.predicting_slice()]

    def book_prompt_tokens(self, *batches) -> None:
        n = sum(int(b.attention_mask.sum() - b.completion_mask.sum()) for b in batches)
        self.trainer.ledger.prompt_tokens += int(self.trainer.reduce_sum(n))
