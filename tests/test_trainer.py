"""The training loop on the tiny model: weights that should move move, frozen ones do not,
normalisation is per optimizer step, resume is exact, ranks agree, 4-bit works on CPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _numerics import tolerance

from opsd_kit.config import load_profile
from opsd_kit.trainer import Trainer, train


def tiny(tmp_path, algorithm="opsd", **overrides):
    values = dict(run_dir=str(tmp_path / algorithm), progress=False)
    values.update(overrides)
    return load_profile("tiny", algorithm, **values)


def base_weights(policy):
    return {n: p.detach().clone() for n, p in policy.causal_lm.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("algorithm", ["opsd", "grpo", "sft"])
def test_steps_change_lora_and_not_base(tmp_path, algorithm):
    # GRPO on a random model gets no reward signal: reward the parity of the first token instead.
    trainer = Trainer(tiny(tmp_path, algorithm, max_steps=3))
    if algorithm == "grpo":
        trainer.algorithm.reward = lambda rollouts, problems: ([float(c[0] % 2) for c in rollouts.completion_ids], {})
    lora_before = trainer.policy.lora_state_dict()
    base_before = base_weights(trainer.policy)
    result = trainer.train()
    assert result.steps == 3
    lora_after = trainer.policy.lora_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    for name, value in base_weights(trainer.policy).items():
        assert torch.equal(value, base_before[name]), name
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(k in rows[0] for k in ("loss/total", "train/grad_norm", "train/lr", "tokens/generated_total",
                                      "time/step", "time/generate", "time/backward", "time/optimizer"))
    assert (result.adapter_dir / "adapter_config.json").is_file()


def test_frozen_teacher_is_the_base_model_after_training(tmp_path):
    from opsd_kit.models import load_causal_lm

    trainer = Trainer(tiny(tmp_path, max_steps=2))
    trainer.train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = load_causal_lm("tiny")
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        student = trainer.policy.model(input_ids=ids).logits
        with trainer.policy.teacher():
            teacher = trainer.policy.model(input_ids=ids).logits
    torch.testing.assert_close(teacher, expected)
    assert not torch.allclose(student, expected)


def test_opsd_ledger_counts_generated_prompt_and_train_tokens(tmp_path):
    result = train(tiny(tmp_path, max_steps=2))
    ledger = result.ledger
    assert ledger["rollouts"] == 2 * 4  # one rollout per problem, 4 problems per step
    assert 0 < ledger["generated_tokens"] <= 8 * 12
    assert ledger["train_tokens"] == ledger["generated_tokens"]  # every completion token carries the loss
    assert ledger["prompt_tokens"] > 0


def test_sft_generates_nothing(tmp_path):
    result = train(tiny(tmp_path, "sft", max_steps=1))
    assert result.ledger["generated_tokens"] == 0 and result.ledger["train_tokens"] > 0


def test_loss_is_normalised_over_the_whole_step_not_per_micro_batch(tmp_path):
    """Same rollouts, different micro-batch sizes: the same step gradient (TRL #4719)."""
    grads = []
    for mbs in (1, 4):
        trainer = Trainer(tiny(tmp_path, run_dir=str(tmp_path / f"mbs{mbs}"), micro_batch_size=mbs, max_steps=1,
                               max_grad_norm=1e9))
        captured = []
        trainer.optimizer.step = lambda c=captured, t=trainer: c.extend(p.grad.clone() for p in t.params)
        trainer.train()
        grads.append(captured)
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        # float32 gradients summed over the step's tokens in a different grouping: bound by the
        # tokens of the step (4 problems x (prompt + completion)) through the model's layers
        cfg = trainer.config
        tokens = cfg.problems_per_step * (cfg.max_prompt_tokens + cfg.max_new_tokens)
        depth = trainer.policy.config.num_hidden_layers
        tol = tolerance(torch.float32, tokens, scale=float(b.abs().max()), depth=depth)
        torch.testing.assert_close(a, b, **tol)


def test_opsd_plus_sft_loss_is_the_divergence_plus_the_weighted_sft_loss_by_hand(tmp_path):
    """OPSD + SFT on the tiny model, one micro-batch per step: the micro-batch's loss is
    sum_div + w (N_div / N_sft) sum_nll (so that the trainer's division by N_div gives
    sum_div / N_div + w sum_nll / N_sft), each part computed here on its own: the divergence by
    the algorithm's plain OPSD loss, the SFT part by hand from full logits."""
    from opsd_kit.losses import divergence

    weight = 0.7
    trainer = Trainer(tiny(tmp_path, sft_weight=weight, micro_batch_size=4, max_steps=1))
    opsd = trainer.algorithm
    (mb,), _ = opsd.prepare(0)
    loss_sum, metrics = opsd.loss(mb)
    model, head = trainer.policy.model, trainer.policy.head
    with trainer.policy.teacher():
        teacher_h = opsd.policy.completion_hidden(mb.teacher)
    student_h = opsd.policy.completion_hidden(mb.student)
    div_sum, _ = divergence(student_h, teacher_h, head, mb.student.completion_mask, opsd.spec)
    problems = trainer.step_problems(0)
    tok = trainer.policy.tokenizer
    nll, n_sft = 0.0, 0
    for i, p in enumerate(problems):
        target = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        row = mb.sft.input_ids[i][mb.sft.attention_mask[i].bool()]
        assert row[-len(target):].tolist() == target  # the reference solution follows the student prompt
        logits = model(input_ids=row[None]).logits[0].float()
        nll -= torch.log_softmax(logits[:-1], -1).gather(-1, row[1:, None])[-len(target):, 0].sum()
        n_sft += len(target)
    n_div = int(mb.student.completion_mask.sum())
    want = div_sum + weight * n_div / n_sft * nll
    tokens = n_div + n_sft
    scale = float(div_sum.detach().abs() + weight * nll.detach().abs())
    tol = tolerance(torch.float32, logits.shape[-1] + tokens, scale=scale)
    torch.testing.assert_close(loss_sum, want, **tol)
    torch.testing.assert_close(torch.tensor(metrics["loss/sft"]), nll / n_sft, **tol)
    torch.testing.assert_close(torch.tensor(metrics["loss/divergence"]), div_sum / n_div, **tol)


def test_opsd_plus_sft_logs_both_parts_and_their_weighted_sum_is_the_loss(tmp_path):
    result = Trainer(tiny(tmp_path, sft_weight=0.5, max_steps=1)).train()  # 2 micro-batches
    (row,) = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert row["loss/total"] == pytest.approx(row["loss/divergence"] + 0.5 * row["loss/sft"], rel=1e-6)
    assert row["loss/sft"] > 0 and "sft/solutions_truncated" in row


def test_plain_opsd_logs_its_normalised_divergence_as_the_loss(tmp_path):
    """Without SFT the divergence is the whole loss: loss/divergence, its micro-batches' shares of
    the step's normalised term, equals loss/total (and not the unnormalised sum)."""
    result = Trainer(tiny(tmp_path, max_steps=1)).train()  # 2 micro-batches
    (row,) = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert row["loss/divergence"] == pytest.approx(row["loss/total"], rel=1e-6) and row["loss/total"] > 0


@pytest.mark.parametrize("algorithm", ["opsd", "grpo"])
def test_resume_reaches_the_same_adapter(tmp_path, algorithm):
    straight = Trainer(tiny(tmp_path, algorithm, run_dir=str(tmp_path / "a"), max_steps=4, save_every=100))
    straight.train()
    first = Trainer(tiny(tmp_path, algorithm, run_dir=str(tmp_path / "b"), max_steps=3, save_every=1))
    first.train()
    resumed = Trainer(tiny(tmp_path, algorithm, run_dir=str(tmp_path / "b"), max_steps=4, resume=True))
    assert resumed.train().steps == 4
    a, b = straight.policy.lora_state_dict(), resumed.policy.lora_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.fixture()
def init_run(tmp_path):
    """A finished tiny SFT run (2 steps) whose adapter other runs start from."""
    trainer = Trainer(tiny(tmp_path, "sft", run_dir=str(tmp_path / "warmup"), max_steps=2, save_every=1))
    trainer.train()
    return trainer


@pytest.mark.parametrize("where", ["run folder", "final adapter", "checkpoint adapter"])
def test_a_run_starts_from_the_init_adapters_weights_exactly(tmp_path, init_run, where):
    from peft.utils import load_peft_weights

    folder = {"run folder": init_run.run_dir, "final adapter": init_run.run_dir / "adapter",
              "checkpoint adapter": init_run.run_dir / "checkpoints" / "step-000001" / "adapter"}[where]
    saved = load_peft_weights(str(folder if where != "run folder" else folder / "adapter"))
    trainer = Trainer(tiny(tmp_path, "opsd", run_dir=str(tmp_path / "opsd"), init_adapter=str(folder)))
    fresh = Trainer(tiny(tmp_path, "opsd", run_dir=str(tmp_path / "fresh")))
    lora, zero = trainer.policy.lora_state_dict(), fresh.policy.lora_state_dict()
    assert len(saved) == len(lora)
    for name, value in lora.items():  # peft saves the weights without the adapter's name
        torch.testing.assert_close(value, saved[name.replace(".default", "")], atol=0, rtol=0)
    assert any(not torch.equal(lora[k], zero[k]) for k in lora)  # not the fresh adapter (LoRA B = 0)
    for name, value in base_weights(trainer.policy).items():
        assert torch.equal(value, base_weights(fresh.policy)[name]), name  # the base model is untouched


def test_the_frozen_teacher_of_a_run_from_an_init_adapter_is_the_initial_model(tmp_path, init_run):
    """Before the first step the teacher computes exactly as the student (both are base + init
    adapter); after a step the student moved and the teacher did not; without init_adapter the
    teacher is the adapter-off base model."""
    trainer = Trainer(tiny(tmp_path, "opsd", run_dir=str(tmp_path / "opsd"), init_adapter=str(init_run.run_dir),
                           max_steps=1, learning_rate=1e-2))
    policy = trainer.policy
    ids = torch.tensor([[5, 9, 13, 2, 7]])

    def logits(teacher: bool):
        with torch.no_grad():
            if teacher:
                with policy.teacher():
                    return policy.model(input_ids=ids).logits
            return policy.model(input_ids=ids).logits

    start = logits(teacher=False)
    assert torch.equal(logits(teacher=True), start)
    with policy.model.disable_adapter(), torch.no_grad():
        assert not torch.equal(policy.model(input_ids=ids).logits, start)  # the init adapter is not the base
    assert policy.swaps_teacher_weights and not trainer.algorithm.prompt_pass.enabled
    trainer.train()
    assert not torch.equal(logits(teacher=False), start)
    assert torch.equal(logits(teacher=True), start)
    assert "start" in torch.load(next((tmp_path / "opsd" / "checkpoints").glob("step-*")) / "trainer_state.pt",
                                 weights_only=True)["policy_extra"]


def test_a_resumed_run_continues_its_own_checkpoint_not_the_init_adapter(tmp_path, init_run):
    """OPSD from an init adapter, 3 steps straight or 2 then a resume: the same adapter (the
    resumed run's teacher is the initial model again, restored from its checkpoint)."""
    init = str(init_run.run_dir)
    straight = Trainer(tiny(tmp_path, "opsd", run_dir=str(tmp_path / "a"), max_steps=3, init_adapter=init))
    straight.train()
    Trainer(tiny(tmp_path, "opsd", run_dir=str(tmp_path / "b"), max_steps=2, save_every=1, init_adapter=init)).train()
    resumed = Trainer(tiny(tmp_path, "opsd", run_dir=str(tmp_path / "b"), max_steps=3, init_adapter=init,
                           resume=True))
    assert resumed.train().steps == 3
    a, b = straight.policy.lora_state_dict(), resumed.policy.lora_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    from opsd_kit.config import ConfigError

    with pytest.raises(ConfigError, match="init_adapter"):  # another start is another run
        Trainer(tiny(tmp_path, "opsd", run_dir=str(tmp_path / "b"), max_steps=4, resume=True))
    card = (tmp_path / "a" / "adapter" / "README.md").read_text()
    assert f"started from the adapter `{init}`" in card and "algorithm `sft`" in card
    # the study's base point is the common start, and runs from different starts are refused
    from opsd_kit.evaluation.study import common_start

    base = common_start({"a": tmp_path / "a", "b": tmp_path / "b"})
    assert (base.tag, base.adapter, base.run_dir) == ("base", str(init_run.run_dir.resolve() / "adapter"),
                                                      str(init_run.run_dir.resolve()))
    with pytest.raises(ValueError, match="different models"):
        common_start({"a": tmp_path / "a", "warmup": init_run.run_dir})


def test_init_adapter_refusals_come_before_the_model_loads(tmp_path, init_run, monkeypatch):
    from opsd_kit.config import ConfigError

    monkeypatch.setattr("opsd_kit.policy.build_policy", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match="neither a run folder"):
        Trainer(tiny(tmp_path, init_adapter=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="LoRA settings"):
        Trainer(tiny(tmp_path, init_adapter=str(init_run.run_dir), lora_r=8))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no final adapter"):
        Trainer(tiny(tmp_path, init_adapter=str(unfinished)))


def test_the_leakage_check_covers_the_runs_a_run_started_from(tmp_path, init_run):
    from opsd_kit.data.problems import Problem
    from opsd_kit.run.lineage import lineage_leakage

    child = Trainer(tiny(tmp_path, "sft", run_dir=str(tmp_path / "child"), max_steps=1,
                         init_adapter=str(init_run.run_dir), train_data="reasoning_gym:chain_sum?max_terms=2"))
    child.train()
    warm = init_run.problems[0]
    held_out = [Problem(id="e0", question=warm.question.upper() + "  ", solution="s", answer="1", source="t"),
                Problem(id=warm.id, question="another question", solution="s", answer="1", source="t")]
    rows = lineage_leakage(child.run_dir, held_out)
    assert [r["run_dir"] for r in rows] == [str(child.run_dir.resolve()), str(init_run.run_dir.resolve())]
    assert all(r["recorded"] for r in rows)
    assert rows[1]["shared_ids"] == [warm.id] and rows[1]["shared_questions"] == ["e0"]
    from opsd_kit.evaluation.study import check_start_leakage

    with pytest.raises(ValueError, match="which trained on held-out problems"):
        check_start_leakage([child.run_dir], held_out)
    check_start_leakage([child.run_dir], [Problem(id="e9", question="unseen", solution="s", answer="1", source="t")])
    check_start_leakage([init_run.run_dir], held_out)  # a run's own problems are the split's business


@pytest.mark.parametrize("algorithm", ["opsd", "grpo", "rlsd", "sft"])
def test_an_algorithm_built_from_its_collaborators_alone_gives_the_trainers_step(tmp_path, algorithm):
    """The algorithm touches only what it is given: one built by hand from its collaborators (a
    fresh ledger, a fresh prompt cache, a fresh sampler) gives the trainer's algorithm's first step
    exactly, micro-batches, losses and booked tokens; and GRPO's batch in flight survives a
    weights-only checkpoint round trip."""
    from opsd_kit.prompts import PromptCache
    from opsd_kit.rollout.sampler import RolloutSampler
    from opsd_kit.run.ledger import TokenLedger
    from opsd_kit.trainer import algorithm_class

    trainer = Trainer(tiny(tmp_path, algorithm))
    cfg, policy = trainer.config, trainer.policy
    cls = algorithm_class(algorithm)
    ledger = TokenLedger()
    collaborators = dict(prompts=PromptCache.build(cfg, policy.tokenizer, trainer.problems,
                                                   teacher=cls.uses_teacher_prompt),
                         ledger=ledger, device=torch.device("cpu"), step_problems=trainer.step_problems)
    if algorithm == "sft":
        collaborators.update(problems=trainer.problems, context_length=None)
    else:
        collaborators["sampler"] = RolloutSampler(policy, backend="hf", seed=cfg.seed)
    by_hand = cls(cfg, policy, **collaborators)

    def first_step(alg):
        micro, metrics = alg.prepare(0)
        losses = [alg.loss(mb)[0] for mb in micro]  # None: a zero-advantage micro-batch, skipped
        return [None if loss is None else float(loss.detach()) for loss in losses], metrics

    assert first_step(by_hand) == first_step(trainer.algorithm)
    assert ledger.state_dict() == {**trainer.ledger.state_dict(), "seconds": ledger.seconds}
    if algorithm in ("grpo", "rlsd"):
        path = tmp_path / "state.pt"
        torch.save(trainer.algorithm.state_dict(), path)
        by_hand.load_state_dict(torch.load(path, weights_only=True))
        assert first_step(by_hand) == first_step(trainer.algorithm)


def test_four_bit_lora_opsd_step_on_cpu(tmp_path):
    trainer = Trainer(tiny(tmp_path, quantization="4bit", max_steps=1))
    assert any("Linear4bit" in type(m).__name__ for m in trainer.policy.model.modules())
    before = trainer.policy.lora_state_dict()
    trainer.train()
    after = trainer.policy.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_sum_over_processes_sums_every_gradient_and_the_loss_in_one_collective():
    """Two ranks simulated: the collective returns this rank's buffer plus the other's. Each
    gradient (float32 and bfloat16, any shape) must become the sum, exactly as adding the two
    float32 values rounds, and the loss sum with it, in one call."""
    from opsd_kit.trainer import sum_over_processes

    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 1, 3)]
    mine = [torch.randn(s, generator=gen) for s in shapes] + [torch.randn(4, generator=gen).bfloat16()]
    other = [torch.randn(g.shape, generator=gen).to(g.dtype) for g in mine]
    expected = [(a.float() + b.float()).to(a.dtype) for a, b in zip(mine, other)]
    other_flat = torch.cat([g.reshape(-1).float() for g in other] + [torch.tensor([2.25])])
    calls = []

    def reduce(flat):
        calls.append(flat.numel())
        return flat + other_flat

    total = sum_over_processes(mine, 1.5, reduce)
    assert calls == [sum(g.numel() for g in mine) + 1]
    assert total == 3.75
    for got, want in zip(mine, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_agree(tmp_path):
    # accelerate launches several CPU processes through torchrun (`--multi_gpu`); `--cpu` would need mpirun.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "--main_process_port", "29533",
           str(Path(__file__).with_name("dist_worker.py")), str(tmp_path), "opsd"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    start = Trainer(load_profile("tiny", run_dir=str(tmp_path / "fresh"), progress=False)).policy.lora_state_dict()
    assert any(not torch.equal(rank0[k], start[k]) for k in rank0)  # it trained
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k


@pytest.mark.parametrize("distributed_type, precision, fragment", [
    ("FSDP", "no", "distributed_type=FSDP is not supported: FSDP shards"),
    ("DEEPSPEED", "no", "distributed_type=DEEPSPEED is not supported: DeepSpeed shards"),
    ("MEGATRON_LM", "no", "distributed_type=MEGATRON_LM"),
    ("MULTI_GPU", "bf16", "mixed_precision='bf16' is not supported"),
])
def test_dist_unsupported_accelerate_modes_fail_before_the_model_loads(tmp_path, monkeypatch, distributed_type,
                                                                       precision, fragment):
    """An accelerate state the trainer does not implement (a forced one: no such launch on a
    CPU machine) is refused with its name, before the policy is built."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from opsd_kit import policy as policy_module
    from opsd_kit.config import ConfigError

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the refusal")

    monkeypatch.setattr(policy_module, "build_policy", no_model)
    state = SimpleNamespace(distributed_type=DistributedType[distributed_type], mixed_precision=precision,
                            num_processes=2, process_index=0, is_main_process=True, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=fragment):
        Trainer(tiny(tmp_path), accelerator=state)


def test_dist_ddp_style_states_are_accepted():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from opsd_kit.trainer import check_accelerator

    for kind in ("NO", "MULTI_CPU", "MULTI_GPU"):
        check_accelerator(SimpleNamespace(distributed_type=DistributedType[kind], mixed_precision="no"))


def test_opsd_steps_on_a_fixed_batch_reduce_the_divergence(tmp_path):
    """The update moves the student towards the privileged teacher (sign and wiring check)."""
    trainer = Trainer(tiny(tmp_path, learning_rate=3e-3, max_grad_norm=1e9))
    micro, _ = trainer.algorithm.prepare(0)
    tokens = sum(mb.num_loss_tokens for mb in micro)
    losses = []
    for _ in range(8):
        total = 0.0
        for mb in micro:
            loss_sum, _ = trainer.algorithm.loss(mb)
            (loss_sum / tokens).backward()
            total += float(loss_sum) / tokens
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(total)
    assert losses[-1] < 0.5 * losses[0], losses


def teacher_prompt_rows(batch) -> list[list[int]]:
    """Each row's prompt ids (the left-padded part before the completion)."""
    p = batch.prompt_width
    return [row[:p][mask[:p].bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]


def test_shuffled_hint_run_gives_each_teacher_another_problems_solution_for_the_whole_run(tmp_path):
    from opsd_kit.prompts import build_prompts, shuffled_hints

    trainer = Trainer(tiny(tmp_path, teacher_hint="shuffled", instruction="Answer with one number."))
    alg, cfg = trainer.algorithm, trainer.config
    hints = shuffled_hints(trainer.problems, cfg.seed)
    assert trainer.shuffled_hints == hints
    builder = build_prompts(cfg, trainer.policy.tokenizer)  # a fresh builder: the expected ids
    by_solution = {p.solution: p for p in trainer.problems}
    for p in trainer.problems:
        other = by_solution[hints[p.id]]
        assert other.id != p.id and other.answer != p.answer
        assert alg.prompts.teacher[p.id] == builder.teacher_ids(p, other.solution) != builder.teacher_ids(p)
        assert "Answer with one number." in trainer.policy.tokenizer.decode(alg.prompts.student[p.id])
    for step in (0, 1):  # the batches of every step hold the same wrong hint per problem
        micro, _ = alg.prepare(step)
        rows = [r for mb in micro for r in teacher_prompt_rows(mb.teacher)]
        problems = trainer.step_problems(step)
        assert rows == [builder.teacher_ids(p, hints[p.id]) for p in problems]
        assert all(mb.wrong_teacher is None for mb in micro)


def test_hint_contrast_steps_change_lora_and_not_base(tmp_path):
    from opsd_kit.prompts import build_prompts

    trainer = Trainer(load_profile("tiny", "opsd", run_dir=str(tmp_path / "r"), max_steps=2,
                                   divergence="hint_contrast", progress=False))
    builder = build_prompts(trainer.config, trainer.policy.tokenizer)
    micro, _ = trainer.algorithm.prepare(0)
    rows = [r for mb in micro for r in teacher_prompt_rows(mb.wrong_teacher)]
    problems = trainer.step_problems(0)
    assert rows == [builder.teacher_ids(p, trainer.shuffled_hints[p.id]) for p in problems]
    assert [r for mb in micro for r in teacher_prompt_rows(mb.teacher)] == [builder.teacher_ids(p) for p in problems]
    for mb in micro:
        assert torch.equal(mb.wrong_teacher.completion_ids, mb.student.completion_ids)
    lora_before = trainer.policy.lora_state_dict()
    base_before = base_weights(trainer.policy)
    result = trainer.train()
    lora_after = trainer.policy.lora_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    for name, value in base_weights(trainer.policy).items():
        assert torch.equal(value, base_before[name]), name
    assert result.last_metrics["loss/divergence_mean"] > 0


@pytest.mark.parametrize("schedule, expected", [
    # 10 steps, 2 of warmup, base lr 1: s / 2 during warmup, then p = (s - 2) / 8
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 0.875, 0.5, 0.125]),
    ("cosine", [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 8)), 0.5, 0.5 * (1 + math.cos(7 * math.pi / 8))]),
])
def test_learning_rate_schedule(schedule, expected):
    from opsd_kit.trainer import make_scheduler

    config = load_profile("tiny", lr_schedule=schedule, warmup_steps=2, max_steps=10, learning_rate=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    scheduler = make_scheduler(optimizer, config)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert [lrs[s] for s in (0, 1, 2, 3, 6, 9)] == pytest.approx(expected)
