"""On-Policy Self-Distillation (arXiv 2601.18734, Algorithm 1 with a frozen teacher).

One step, per problem x with reference solution y*:
  1. the student samples y^ ~ p_S(. | x) (one sample per problem);
  2. teacher forward on [teacher prompt(x, y*) ++ y^] without grad, student forward on
     [student prompt(x) ++ y^]: the same completion ids, different contexts;
  3. at every completion position n, D(p_T(. | x, y*, y^<n) || p_S(. | x, y^<n)) over the full
     vocabulary (forward KL by default), summed over the step's completion tokens and divided
     by their count (the trainer does the division); gradients reach the student only.

Controls that tell signal from style: ``teacher_hint='shuffled'`` puts another problem's
solution in the teacher prompt (what is left is style); ``divergence='hint_contrast'`` adds a
third forward pass, the teacher with that wrong hint, and trains on what the correct hint adds
over it (``losses.hint_contrast_divergence``).
"""
from __future__ import annotations

from .algorithm import Algorithm, MicroBatch


class OPSD(Algorithm):
    uses_teacher_prompt = True

    def prepare(self, step: int):
        from .prompts import build_batch

        problems = self.trainer.step_problems(step)
        rollouts = self.rollouts(problems, step, n=1)
        metrics = self.rollout_metrics(rollouts, self.grade(rollouts, problems))
        pad = self.tokenizer.pad_token_id
        micro = []
        for rows in self.chunks(len(rollouts)):
            completions = [rollouts.completion_ids[r] for r in rows]
            chosen = [problems[rollouts.prompt_index[r]] for r in rows]
            student = build_batch([self.student_prompt(p) for p in chosen], completions, pad)
            teacher = build_batch([self.teacher_prompt(p) for p in chosen], completions, pad)
            wrong = (build_batch([self.wrong_teacher_prompt(p) for p in chosen], completions, pad)
                     if self.config.divergence == "hint_contrast" else None)
            self.book_prompt_tokens(*(b for b in (student, teacher, wrong) if b is not None))
            micro.append(MicroBatch(student=student, teacher=teacher, wrong_teacher=wrong,
                                    num_loss_tokens=int(student.completion_mask.sum())))
        metrics["prompt/teacher_truncated_total"] = self.builder.stats["teacher_truncated"]
        return micro, metrics

    def loss(self, mb: MicroBatch):
        import torch

        from .losses import chunked_divergence, chunked_token_logprobs, sampled_token_loss

        cfg, tr = self.config, self.trainer
        device = tr.accelerator.device
        mask_BC = mb.student.completion_mask.to(device)
        with tr.phase("teacher"), self.policy.teacher():  # adapter off (frozen), no grad
            teacher_h_BCH = self.hidden(mb.teacher)
            wrong_h_BCH = None if mb.wrong_teacher is None else self.hidden(mb.wrong_teacher)
        with tr.phase("student"):
            student_h_BCH = self.hidden(mb.student)
            temperature = cfg.effective_loss_temperature
            if cfg.divergence == "sampled_token":
                targets_BC = mb.student.completion_ids.to(device)
                student_lp = chunked_token_logprobs(student_h_BCH, self.policy.head, targets_BC,
                                                    temperature=temperature, chunk_size=cfg.loss_chunk_size)
                with torch.no_grad():
                    teacher_lp = chunked_token_logprobs(teacher_h_BCH, self.policy.head, targets_BC,
                                                        temperature=temperature, chunk_size=cfg.loss_chunk_size)
                loss_sum = sampled_token_loss(student_lp, teacher_lp, mask_BC, clamp=cfg.sampled_token_clamp,
                                              normalizer=1.0)
                per_token = (teacher_lp - student_lp).detach() * mask_BC
            else:
                truncate = (cfg.top_k or None, cfg.top_p if cfg.top_p < 1 else None)
                loss_sum, per_token = chunked_divergence(
                    student_h_BCH, teacher_h_BCH, self.policy.head, mask_BC,
                    kind="forward_kl" if cfg.divergence == "topk" else cfg.divergence,
                    beta=cfg.jsd_beta, temperature=temperature, clip=cfg.clip_tau,
                    top_k_support=cfg.distill_topk if cfg.divergence == "topk" else None,
                    truncate=truncate if cfg.loss_support == "truncated" else None,
                    truncate_temperature=cfg.temperature,
                    chunk_size=cfg.loss_chunk_size, wrong_teacher_hidden_BTH=wrong_h_BCH, alpha=cfg.contrast_alpha)
        real = per_token[mask_BC.bool()]  # completion tokens only, never padding
        metrics = {"loss/divergence_mean": float(real.mean()) if real.numel() else 0.0,
                   "loss/divergence_max": float(real.max()) if real.numel() else 0.0}
        return loss_sum, metrics
