"""One training loop for OPSD and its baselines, on HF accelerate.

The loop owns what every algorithm shares: seeding, data order, the policy, AdamW with gradient
accumulation and a schedule, gradient clipping, the token ledger, metrics, checkpoints,
resume, non-finite guards, Ctrl-C / SIGTERM and out-of-memory handling. An algorithm (`opsd.OPSD`,
`grpo.GRPO`, `sft.SFT`, `rlsd.RLSD`) only says how a step's problems become micro-batches and how a
micro-batch becomes a summed loss.

Normalisation: an algorithm returns the SUM of its per-unit losses; the loop divides by the
number of loss units of the whole optimizer step over all processes (tokens; rollouts for GRPO's
``loss_normalisation="sequence"``, whose per-rollout sums are each a token mean), and sums
gradients over processes. The step's gradient is therefore the gradient of (sum over all the
step's units) / (their count), whatever the micro-batch size or process count (TRL #4719).

Distribution: `accelerate launch -m opsd_kit.apps.cli train ...` runs one process per device
(DDP-style: each holds the whole model). Each process takes its share of the step's problems;
gradients of the trainable weights are summed with one `accelerator.reduce` of their
concatenation before clipping (`sum_over_processes`), so every process applies the same
update. The model is never wrapped by `accelerator.prepare`, so the modes that would shard or
cast it (FSDP, DeepSpeed, Megatron-LM, XLA, accelerate's mixed precision) are refused before
anything loads (`check_accelerator`).
"""
from __future__ import annotations

import math
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from opsd_kit.config import GROUP_ALGORITHMS, ConfigError, TrainConfig


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class OutOfMemoryStop(RuntimeError):
    """The device ran out of memory; a checkpoint was saved."""


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    metrics_path: Path
    steps: int
    ledger: dict
    interrupted: bool = False
    last_metrics: dict = field(default_factory=dict)
    signal: int | None = None
    """The signal that stopped an interrupted run (SIGINT: Ctrl-C, SIGTERM: a scheduler); the
    command line exits with 128 + it."""


def train(config: TrainConfig, *, problems=None, policy=None, accelerator=None, reward_funcs=None) -> TrainResult:
    """Train with ``config``. ``problems`` overrides ``config.train_data``: a list of Problem, or a
    list of dicts, a ``datasets.Dataset`` or a pandas DataFrame read by `opsd_kit.data.problems.load_problems`;
    ``policy`` reuses an already-loaded policy (its weights are trained in place); ``reward_funcs``
    (GRPO, RLSD) replaces ``config.rewards`` with your own functions ``fn(completions, problems) ->
    list[float]``, a list or ``{name: fn}``, weighted by ``config.reward_weights``
    (`opsd_kit.algorithms.rewards`)."""
    return Trainer(config, problems=problems, policy=policy, accelerator=accelerator,
                   reward_funcs=reward_funcs).train()


#: accelerate modes that shard, offload or compile the model: the trainer holds the whole model in
#: every process and reduces the LoRA gradients itself, so under these it would not do what they say.
UNSUPPORTED_DISTRIBUTED = {
    "FSDP": "FSDP shards the model over processes",
    "DEEPSPEED": "DeepSpeed shards or offloads the model and optimizer",
    "MEGATRON_LM": "Megatron-LM splits the model over processes",
    "XLA": "XLA (TPU) runs a compiled graph",
}


def check_accelerator(accelerator) -> None:
    """Refuse an accelerate state the trainer does not implement, before any model loads.

    Supported: one process, or several DDP-style processes (``accelerate launch --multi_gpu
    --num_processes N``; on CPU as well), each holding the whole model. Refused with a
    `ConfigError`: FSDP, DeepSpeed, Megatron-LM and XLA (``UNSUPPORTED_DISTRIBUTED``), and
    accelerate's mixed precision (the dtype is the config's ``dtype``), which would otherwise be
    ignored: a run that looked sharded or cast but was not.
    """
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in UNSUPPORTED_DISTRIBUTED:
        raise ConfigError(
            f"accelerate's distributed_type={kind} is not supported: {UNSUPPORTED_DISTRIBUTED[kind]}, but "
            "opsd_kit's trainer holds the whole model in every process and sums the LoRA gradients itself "
            "(DDP-style); launch with `accelerate launch --multi_gpu --num_processes N -m opsd_kit.apps.cli "
            "train ...` and no FSDP/DeepSpeed config (a base that does not fit one device: quantization='4bit')")
    precision = getattr(accelerator, "mixed_precision", "no")
    if precision not in (None, "no"):
        raise ConfigError(f"accelerate's mixed_precision={precision!r} is not supported: the trainer computes in "
                          "the config's dtype; launch with --mixed_precision no and set dtype='bfloat16' instead")


class Trainer:
    def __init__(self, config: TrainConfig, *, problems=None, policy=None, accelerator=None, reward_funcs=None):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from opsd_kit.data.problems import as_problems
        from opsd_kit.run.rundir import RunDir

        # Every check of the configuration runs before the model's weights load.
        self.config = config.validate()
        config.check_trackers()
        self.start = RunDir(config.run_dir).plan_start(config)  # resume, start fresh, or refuse: before any load
        self.init, self.lineage = None, []
        if config.init_adapter:  # an adapter of this model and layout, read before anything loads
            from opsd_kit.run.lineage import lineage, resolve_init_adapter

            self.init, self.lineage = resolve_init_adapter(config), lineage(config)
        self.context_length, context_source = _context_length(config, policy)
        config.check_context(self.context_length, context_source)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        check_accelerator(self.accelerator)
        config.check_world(self.accelerator.num_processes)
        builder = _prompt_builder(config, policy)  # the tokenizer loads (cheap), the model does not
        check = partial(builder.length_error, teacher=algorithm_class(config.algorithm).uses_teacher_prompt)
        self.problems = as_problems(problems, check) if problems is not None else _load_train_problems(config, check)
        if not self.problems:
            source = "problems=[]" if problems is not None else f"train_data={config.train_data!r}"
            raise ConfigError(f"{source} gave no problems: the dataset is empty; train_data must name a "
                              "source with at least one valid problem")
        counts = Counter(p.id for p in self.problems)
        dup, times = counts.most_common(1)[0]
        if times > 1:
            raise ConfigError(f"problem ids must be unique: {dup!r} appears {times} times")
        self.shuffled_hints = _shuffled_hints(config, self.problems)
        if reward_funcs is not None and config.algorithm not in GROUP_ALGORITHMS:
            raise ConfigError(f"reward_funcs are GRPO's and RLSD's rewards; algorithm={config.algorithm!r} has none")
        if config.algorithm in GROUP_ALGORITHMS:
            from opsd_kit.algorithms.rewards import reward_names

            reward_names(config, reward_funcs)  # the weights match the terms: before any model loads
        self.reward_funcs = reward_funcs
        self.prompts, self.solution_targets = self._tokenise(builder)  # before the weights load: may refuse
        set_seed(config.seed)  # python, numpy, torch (all devices)
        self.run_dir = Path(config.run_dir)
        if policy is None:
            from opsd_kit.policy import build_policy

            policy = build_policy(config, self.accelerator.device)
        self.policy = policy
        if self.init is not None:
            if self.start.checkpoint is None:  # a resumed run loads its own checkpoint
                policy.load_adapter(self.init.adapter_dir)
            policy.mark_start()  # the frozen teacher is the initial model (a resume restores it from the checkpoint)
        from opsd_kit.run.ledger import TokenLedger

        self.ledger = TokenLedger()
        self.ledger.reduce_sum = self.reduce_sum
        self.ledger.sync = torch.cuda.synchronize if self.accelerator.device.type == "cuda" else None
        self.algorithm = self._make_algorithm()
        self.params = self.policy.trainable_parameters()
        if not self.params:
            raise ValueError("the policy has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.step = 0

    def _tokenise(self, builder):
        """``(prompts, solution_targets)``: every training problem's prompt ids (`PromptCache`, from
        ``builder``, the one that checked them) and, for SFT and OPSD's ``sft_weight`` term, its
        reference solution's target ids (`SolutionTargets`, else None). They need the tokenizer
        only, and refuse what does not fit, so they are built before the weights load."""
        from opsd_kit.prompts import PromptCache

        cfg = self.config
        prompts = PromptCache.build(cfg, builder.tokenizer, self.problems,
                                    teacher=algorithm_class(cfg.algorithm).uses_teacher_prompt,
                                    wrong_hints=self.shuffled_hints, builder=builder)
        if not (cfg.algorithm == "sft" or (cfg.algorithm == "opsd" and cfg.sft_weight)):
            return prompts, None
        from opsd_kit.algorithms.sft import SolutionTargets

        return prompts, SolutionTargets(cfg, builder.tokenizer, self.problems, prompts, self.context_length)

    def _make_algorithm(self):
        """The run's algorithm, given exactly the collaborators it uses."""
        cfg = self.config
        cls = algorithm_class(cfg.algorithm)
        collaborators = dict(prompts=self.prompts, ledger=self.ledger, device=self.accelerator.device,
                             step_problems=self.step_problems)
        if cfg.algorithm == "sft":
            return cls(cfg, self.policy, targets=self.solution_targets, **collaborators)
        if self.solution_targets is not None:
            collaborators.update(sft_targets=self.solution_targets)
        from opsd_kit.rollout.sampler import RolloutSampler

        sampler = RolloutSampler(
            self.policy, backend=cfg.rollout_backend, seed=cfg.seed, num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index, adapter_dir=str(self.run_dir / "vllm_adapter"),
            engine=dict(model_name=cfg.model, quantization=cfg.quantization, dtype=cfg.dtype,
                        max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens, max_lora_rank=cfg.lora_r))
        if cfg.algorithm in GROUP_ALGORITHMS:
            collaborators["reward_funcs"] = self.reward_funcs
        return cls(cfg, self.policy, sampler=sampler, **collaborators)

    # -------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def step_problems(self, step: int) -> list:
        """This process's problems for ``step``: a seeded permutation per epoch, then a
        contiguous slice of ``problems_per_step``, shared out over processes."""
        import numpy as np

        pps, n = self.config.problems_per_step, len(self.problems)
        picked = []
        for pos in range(step * pps, (step + 1) * pps):
            epoch, offset = divmod(pos, n)
            order = np.random.default_rng([self.config.seed, epoch]).permutation(n)
            picked.append(self.problems[int(order[offset])])
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return picked[rank::world]

    def reduce_sum(self, value: float) -> float:
        """Sum a number over processes."""
        import torch

        if self.accelerator.num_processes == 1:
            return float(value)
        t = torch.tensor(float(value), device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum"))

    # -------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        from opsd_kit.run.metrics import MetricsLogger
        from opsd_kit.run.rundir import RunDir

        cfg = self.config
        if self.start.checkpoint is not None:
            self._restore(self.start.checkpoint)
            if self._finished():
                if self.is_main:
                    further = ("raise max_steps to train further" if cfg.lr_schedule == "constant" else
                               f"its {cfg.lr_schedule} schedule ended there: train longer from the start in "
                               "another run_dir")
                    print(f"{self.run_dir} is already finished (step {self.step} of {cfg.max_steps}): nothing to "
                          f"do; {further}.")
                return self._result(interrupted=False, last={})
            if self.is_main:
                print(f"resuming from step {self.step} of {cfg.max_steps} in {self.run_dir}")
        elif self.start.discard and self.is_main:
            removed = RunDir(self.run_dir).discard_previous_run()
            print(f"overwrite=True: deleted the previous run's {removed} checkpoints and final adapter in "
                  f"{self.run_dir}; starting over.")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            from opsd_kit.run.lineage import write_trained_on

            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
            write_trained_on(self.run_dir, self.problems)  # for the leakage check of runs that start from this one
        logger = MetricsLogger(self.run_dir / "metrics.jsonl", trackers=cfg.trackers,
                               resume_step=self.step if self.start.checkpoint else None, config=cfg.to_dict(),
                               enabled=self.is_main)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.algorithm,
                   disable=not (cfg.progress and self.is_main))
        nonfinite_in_a_row, last, interrupted, stop = 0, {}, False, None
        ledger_done = self.ledger.state_dict()  # the counts after self.step complete steps
        clock = time.perf_counter()
        caught: list[int] = []  # SIGINT or SIGTERM, raised as KeyboardInterrupt
        restore_signals = _signals_as_interrupts(caught)
        try:
            while self.step < cfg.max_steps and not self._budget_spent():
                metrics = self._optimizer_step()
                nonfinite_in_a_row = nonfinite_in_a_row + 1 if metrics["train/skipped_nonfinite"] else 0
                self.step += 1
                now = time.perf_counter()
                self.ledger.wall_seconds += now - clock  # checkpoint writes count in the next step
                clock = now
                ledger_done = self.ledger.state_dict()
                metrics.update(step=self.step, **self.ledger.metrics())
                metrics["time/elapsed"] = round(self.ledger.wall_seconds, 3)
                logger.log(metrics)
                last = metrics
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4g}" for k in ("loss/total", "train/grad_norm")
                                 if isinstance(metrics.get(k), float)})
                if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    self._save()
                    raise NonFiniteLossError(
                        f"{nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                        f"(max_nonfinite_steps={cfg.max_nonfinite_steps}); checkpoint saved at step {self.step}. "
                        "Lower learning_rate, raise max_grad_norm clipping, or use dtype='float32'")
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps or self._budget_spent():
                    self._save()
            if self._budget_spent() and self.is_main and cfg.progress:
                print(f"Rollout-token budget reached after step {self.step}: {self.ledger.generated_tokens} "
                      f"generated tokens >= max_generated_tokens={cfg.max_generated_tokens}.")
        except KeyboardInterrupt:
            interrupted, stop = True, caught[0] if caught else signal.SIGINT
            self._rewind_partial_step(ledger_done)
            self._save()
            if self.is_main:
                name = signal.Signals(stop).name
                print(f"Interrupted ({name}): checkpoint saved at step {self.step} in {self.run_dir}; "
                      "rerun the same command to resume.")
        except Exception as err:
            if _is_oom(err):
                self._rewind_partial_step(ledger_done)
                self._save()
                lengths = (("max_target_tokens",) if cfg.algorithm == "sft"  # SFT samples nothing
                           else ("max_new_tokens", "generation_batch_size"))
                lower = ", ".join(f"{key} (now {getattr(cfg, key)})" for key in ("micro_batch_size", *lengths))
                raise OutOfMemoryStop(
                    f"out of memory at step {self.step + 1} ({err}). A checkpoint of step {self.step} was saved. "
                    f"Lower {lower}, or set gradient_checkpointing=True, then rerun: it resumes from the "
                    "checkpoint") from err
            raise
        finally:
            bar.close()
            restore_signals()
        if self.is_main:
            self.policy.save_adapter(self.run_dir / "adapter")
            self._fill_card(self.run_dir / "adapter", interrupted)
        self.accelerator.wait_for_everyone()
        return self._result(interrupted, last, stop)

    def _finished(self) -> bool:
        """The restored run is at its end (max_steps or the token budget) and saved its final adapter."""
        done = self.step >= self.config.max_steps or self._budget_spent()
        return done and (self.run_dir / "adapter").is_dir()

    def _result(self, interrupted: bool, last: dict, stop: int | None = None) -> TrainResult:
        return TrainResult(self.run_dir, self.run_dir / "adapter", self.run_dir / "metrics.jsonl", self.step,
                           self.ledger.state_dict(), interrupted, last, None if stop is None else int(stop))

    def _fill_card(self, adapter_dir: Path, interrupted: bool) -> None:
        """Write what was trained, on what and how into the final adapter's card."""
        from opsd_kit.run.card import training_sections, update_card

        sections = training_sections(self.config, steps=self.step, ledger=self.ledger.state_dict(),
                                     n_problems=len(self.problems), adapter_dir=adapter_dir, interrupted=interrupted,
                                     lineage=self.lineage, rewards=self._reward_terms())
        for name, markdown in sections.items():
            update_card(adapter_dir, name, markdown)

    def _reward_terms(self) -> tuple | None:
        """``(name, weight)`` of the run's reward terms (GRPO, RLSD), else None."""
        rewards = getattr(self.algorithm, "rewards", None)
        return None if rewards is None else tuple(zip(rewards.names, rewards.weights))

    def _budget_spent(self) -> bool:
        """True once the run's generated tokens reach ``max_generated_tokens``."""
        budget = self.config.max_generated_tokens
        return budget is not None and self.ledger.generated_tokens >= budget

    def _optimizer_step(self) -> dict:
        import torch

        cfg = self.config
        step_start = time.perf_counter()
        before = dict(self.ledger.seconds)
        micro_batches, metrics = self.algorithm.prepare(self.step)
        from opsd_kit.algorithms.base import loss_units

        local_tokens = sum(mb.num_loss_tokens for mb in micro_batches)
        total_tokens = self.reduce_sum(local_tokens)
        self.ledger.train_tokens += int(total_tokens)
        total_units = self.reduce_sum(sum(loss_units(mb) for mb in micro_batches))  # the loss divisor
        loss_sum_local = 0.0
        extra: dict[str, list] = {}
        skipped = 0
        for mb in micro_batches:
            loss_sum, mb_metrics = self.algorithm.loss(mb)
            if loss_sum is None:  # the algorithm says this micro-batch's loss and gradient are exactly 0
                skipped += 1
                continue
            with self.ledger.phase("backward"):
                (loss_sum / max(total_units, 1.0)).backward()
            loss_sum_local += float(loss_sum.detach())
            for k, v in mb_metrics.items():
                extra.setdefault(k, []).append(v)
        with self.ledger.phase("optimizer"):
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if self.accelerator.num_processes > 1:
                loss_sum_local = sum_over_processes([p.grad for p in self.params], loss_sum_local,
                                                    partial(self.accelerator.reduce, reduction="sum"))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
            loss = loss_sum_local / max(total_units, 1.0)
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            if finite:
                self.optimizer.step()
                self.scheduler.step()
                if self.policy.teacher_mode == "ema":
                    self.policy.update_ema()
            self.optimizer.zero_grad(set_to_none=True)
        summed = {k: self.reduce_sum(sum(extra.pop(k))) for k in self.algorithm.summed_metrics if k in extra}
        metrics.update(_reduce_lists(extra), **summed)
        metrics.update({
            "loss/total": loss, "train/grad_norm": grad_norm, "train/lr": lr,
            "train/skipped_nonfinite": int(not finite), "tokens/loss_tokens": int(total_tokens),
            "train/zero_gradient_micro_batches": skipped,
            "time/step": round(time.perf_counter() - step_start, 4),
        })
        for name, total in self.ledger.seconds.items():
            metrics[f"time/{name}"] = round(total - before.get(name, 0.0), 4)
        return metrics

    def _rewind_partial_step(self, ledger_done: dict) -> None:
        """Forget a step stopped half-way (its gradients and the tokens it booked), so that the
        checkpoint is the state after ``self.step`` complete steps and a resume recounts nothing."""
        self.optimizer.zero_grad(set_to_none=True)
        seconds, wall = self.ledger.seconds, self.ledger.wall_seconds  # time spent is real; counts rewind
        self.ledger.load_state_dict(ledger_done)
        self.ledger.seconds, self.ledger.wall_seconds = seconds, wall

    # -------------------------------------------------------------------------------------
    def _save(self) -> None:
        from opsd_kit.run.checkpoint import rng_state, save_checkpoint

        # Each process's own algorithm state (GRPO's batch in flight) and RNG, gathered to the main one.
        per_rank = [{"algorithm": self.algorithm.state_dict(), "rng": rng_state()}]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            per_rank = gather_object(per_rank)
        if self.is_main:
            state = {"per_rank": per_rank}
            save_checkpoint(self.run_dir, self.step, policy=self.policy, optimizer=self.optimizer,
                            scheduler=self.scheduler, ledger=self.ledger, keep=self.config.keep_checkpoints,
                            extra=state)
        self.accelerator.wait_for_everyone()

    def _restore(self, path: Path) -> None:
        from opsd_kit.run.checkpoint import load_trainer_state, set_rng_state

        state = load_trainer_state(path)
        self.policy.load_adapter(path / "adapter")
        self.policy.load_extra_state(state["policy_extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ledger.load_state_dict(state["ledger"])
        per_rank = state["extra"]["per_rank"]
        if len(per_rank) != self.accelerator.num_processes:
            raise ValueError(f"checkpoint {path} was written by {len(per_rank)} processes; resume it with as many "
                             f"(now {self.accelerator.num_processes})")
        own = per_rank[self.accelerator.process_index]
        self.algorithm.load_state_dict(own["algorithm"])
        set_rng_state(own["rng"])
        self.step = state["step"]


# -----------------------------------------------------------------------------------------
def make_scheduler(optimizer, cfg: TrainConfig):
    """``cfg.lr_schedule`` after ``cfg.warmup_steps`` of linear warmup, by `transformers.get_scheduler`:
    the factor of the learning rate at step s (0-based) is s / warmup_steps during warmup, then 1
    (constant), 1 - p (linear) or (1 + cos(pi p)) / 2 (cosine), p = (s - warmup_steps) /
    (max_steps - warmup_steps)."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)


def _signals_as_interrupts(caught: list):
    """Make SIGINT (Ctrl-C) and SIGTERM (what schedulers send before killing a job) raise
    KeyboardInterrupt and append their number to ``caught``; return the function that puts the
    previous handlers back. Only the first signal raises: later ones, while the checkpoint is
    written, are ignored. Off the main thread signals cannot be handled: nothing changes there."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        if not caught:
            caught.append(signum)
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore():
        for s, old in previous.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)

    return restore


def sum_over_processes(grads: list, value: float, reduce) -> float:
    """Sum ``grads`` (in place) and ``value`` over processes with ONE collective, ``reduce(flat)``
    (`accelerator.reduce` with ``reduction="sum"``), and return the summed ``value``. The tensors
    are flattened into one float32 buffer, as DDP buckets its gradients: every collective pays a
    fixed latency, and a LoRA adapter has two tensors per adapted linear (420 for SmolLM2's 210)."""
    import torch

    flat = torch.cat([g.reshape(-1).float() for g in grads]
                     + [torch.tensor([value], dtype=torch.float32, device=grads[0].device)])
    flat = reduce(flat)
    for g, summed in zip(grads, flat[:-1].split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))
    return float(flat[-1])


def _reduce_lists(values: dict[str, list]) -> dict:
    out = {}
    for k, v in values.items():
        out[k] = max(v) if k.endswith("_max") else sum(v) / len(v)
    return out


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def _context_length(cfg: TrainConfig, policy=None) -> tuple[int | None, str]:
    """The model's context length and where it was read, from the loaded policy or from the
    model's config file (cheap: no weights load). ``None`` when it cannot be read here."""
    if policy is not None:
        model_config, where = policy.model.config, "the policy's model config"
    else:
        from transformers import AutoConfig

        from opsd_kit.models import resolve_model_path

        try:
            model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model))
        except (OSError, ValueError):  # not reachable here: loading the weights will say why
            return None, ""
        where = f"config of model {cfg.model!r}"
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value, f"{key} in the {where}"
    return None, ""


def _prompt_builder(cfg: TrainConfig, policy=None):
    """The run's `opsd_kit.prompts.PromptBuilder` on its tokenizer (the policy's, else loaded
    alone): its ``length_error`` refuses a training problem whose prompts cannot fit
    ``max_prompt_tokens``, and the run's `PromptCache` takes the ids it tokenised."""
    from opsd_kit.models import load_tokenizer
    from opsd_kit.prompts import build_prompts

    return build_prompts(cfg, policy.tokenizer if policy is not None else load_tokenizer(cfg.model))


def _load_train_problems(cfg: TrainConfig, check=None):
    """``cfg.train_data`` (every row ``check``ed, see `opsd_kit.data.sources.load_source`); the
    load report's warnings go to stderr."""
    import sys

    from opsd_kit.data.sources import load_source

    problems, report = load_source(cfg.train_data, size=cfg.train_size, seed=cfg.seed, check=check)
    if report.warnings or report.unused_columns:
        print(f"train_data: {report}", file=sys.stderr)
    return problems


def _shuffled_hints(cfg: TrainConfig, problems) -> dict | None:
    """The run's wrong-hint mapping (problem id -> another problem's solution, fixed by the seed
    for the whole run) when teacher_hint='shuffled' or divergence='hint_contrast' uses it, else None.
    Built before the model loads, so problems that allow no wrong hint fail early."""
    if cfg.algorithm != "opsd" or (cfg.teacher_hint == "reference" and cfg.divergence != "hint_contrast"):
        return None
    from opsd_kit.prompts import shuffled_hints

    try:
        return shuffled_hints(problems, cfg.seed)
    except ValueError as err:
        key = f"teacher_hint={cfg.teacher_hint!r}" if cfg.teacher_hint != "reference" else "divergence='hint_contrast'"
        raise ConfigError(f"{key} needs a wrong hint for every training problem: {err}") from err


def algorithm_class(name: str):
    """The `algorithm.Algorithm` subclass of ``TrainConfig.algorithm`` ``name``."""
    if name == "opsd":
        from opsd_kit.algorithms.opsd import OPSD

        return OPSD
    if name == "grpo":
        from opsd_kit.algorithms.grpo import GRPO

        return GRPO
    if name == "rlsd":
        from opsd_kit.algorithms.rlsd import RLSD

        return RLSD
    from opsd_kit.algorithms.sft import SFT

    return SFT
