"""The privileged prompt builder and contiguous batches (docs/algorithm.md, Teacher; Pitfalls, 1-3 and 8).

Student: p_S(. | x) sees the problem and the instruction. Teacher: p_T(. | x, y*) sees the
problem, the verified reference solution y* between markers, a transition asking it to
understand the solution and solve in its own words, and the same instruction. The teacher is
rendered with the tokenizer's chat template (generation prompt added); the student with it
(``student_prompt_format="chat"``) or as the bare message text (``"plain"``: what the official
GRPO script and, through TRL's GOLD trainer, the published OPSD runs gave the student). Each
role has its own thinking switch (Qwen3 ``enable_thinking``; no effect on a plain prompt).

An over-long teacher prompt loses the MIDDLE of its reference solution: the beginning and the
end (where the final answer is) stay, joined by ``TRUNCATION_MARK``.

Alignment guarantee: the teacher's input is ``teacher_prompt_ids + completion_ids`` with the
student's sampled completion ids byte for byte; nothing is decoded and re-tokenised.
"""
from __future__ import annotations

from dataclasses import dataclass

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

STUDENT_TEMPLATE = "{question}\n\n{instruction}"

TEACHER_TEMPLATE = (
    "{question}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n\n"
    "After understanding the reference solution, do not copy it: solve the problem again in "
    "your own words.\n\n{instruction}"
)

#: The GRPO baseline's student message (official grpo_train.py L111: "Problem: ", the question,
#: a newline and a space, then the instruction), given to the model as plain text.
GRPO_STUDENT_TEMPLATE = "Problem: {question}\n {instruction}"

#: The OPSD and RLSD student message of the official code (data_collator.py L52, rlsd_train.py
#: L127): "Problem: ", the question, a blank line, the instruction.
PROBLEM_STUDENT_TEMPLATE = "Problem: {question}\n\n{instruction}"

#: The prompt the published OPSD student sampled from: the official opsd_trainer.py (L856-864)
#: hands vLLM the chat-templated student prompt decoded without special tokens (the official
#: README's implementation note), i.e. Qwen3's template with <|im_start|> and <|im_end|> removed.
#: Used with ``student_prompt_format="plain"``.
OPSD_SAMPLED_STUDENT_TEMPLATE = "user\nProblem: {question}\n\n{instruction}\nassistant\n"

#: The RLSD teacher message of the official rlsd_train.py (L130-141): the reference solution is
#: "privileged evidence" to solve from in the model's own words.
RLSD_TEACHER_TEMPLATE = (
    "Problem: {question}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n\n"
    "Using the reference solution only as privileged evidence, solve the problem in your own words. "
    "{instruction}"
)

#: The SFT baseline's prompt (official sft_train.py L31: "Problem: {Question}\nSolution: {solution}",
#: one plain text); the reference solution follows as the target.
SFT_STUDENT_TEMPLATE = "Problem: {question}\nSolution:"

PROMPT_FORMATS = ("chat", "plain")
"""How the student message becomes a prompt: 'chat' (the tokenizer's chat template, generation
prompt added) or 'plain' (the message text alone, no special tokens added)."""

TRUNCATION_MARK = " [...] "

#: The placeholders each template must contain ({instruction} is optional in both).
REQUIRED_PLACEHOLDERS = {"student_template": ("{question}",), "teacher_template": ("{question}", "{solution}")}


def template_error(name: str, template: str) -> str | None:
    """Why ``template`` (``"student_template"`` or ``"teacher_template"``) cannot be used, or None.

    It must contain its required placeholders and format with ``question``, ``solution`` and
    ``instruction`` only (literal braces are written ``{{`` and ``}}``).
    """
    missing = [k for k in REQUIRED_PLACEHOLDERS[name] if k not in template]
    if missing:
        return f"{name} must contain the placeholders {missing}; got {template!r}"
    try:
        template.format(question="", solution="", instruction="")
    except (KeyError, IndexError, ValueError) as err:
        return (f"{name} does not format with {{question}}, {{solution}} and {{instruction}} ({err!r}); "
                f"write literal braces as '{{{{' and '}}}}'; got {template!r}")
    return None


class PromptTooLongError(ValueError):
    """A prompt does not fit even after shortening the reference solution."""


class PromptBuilder:
    """Render student and teacher prompts as token ids.

    Args:
        tokenizer: a tokenizer with a chat template.
        student_thinking / teacher_thinking: passed as ``enable_thinking`` to the chat template
            when not None (paper: student off, teacher on).
        student_template / teacher_template: ``str.format`` templates with ``{question}``,
            ``{instruction}`` and, for the teacher, ``{solution}``.
        instruction: the answer-format instruction shared by both roles.
        system_prompt: an optional system turn for both roles.
        max_prompt_tokens: cap on either prompt. An over-long teacher prompt is shortened by
            cutting the middle of the reference solution: its first and last halves of the room
            left stay, so the final answer at its end is kept (never the problem or the
            instruction); ``stats['teacher_middle_cut']`` counts how often. A prompt that cannot
            fit raises :class:`PromptTooLongError` naming the problem.
        student_prompt_format: 'chat' or 'plain' (:data:`PROMPT_FORMATS`).
    """

    def __init__(self, tokenizer, *, student_thinking: bool | None = None,
                 teacher_thinking: bool | None = None, student_template: str = STUDENT_TEMPLATE,
                 teacher_template: str = TEACHER_TEMPLATE, instruction: str = INSTRUCTION,
                 system_prompt: str | None = None, max_prompt_tokens: int | None = None,
                 student_prompt_format: str = "chat"):
        if student_prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"student_prompt_format must be one of {list(PROMPT_FORMATS)}, "
                             f"got {student_prompt_format!r}")
        if tokenizer.chat_template is None:
            raise ValueError("PromptBuilder needs a tokenizer with a chat template")
        for name, tmpl in (("student_template", student_template), ("teacher_template", teacher_template)):
            error = template_error(name, tmpl)
            if error:
                raise ValueError(error)
        self.tokenizer = tokenizer
        self.student_thinking = student_thinking
        self.teacher_thinking = teacher_thinking
        self.student_template = student_template
        self.teacher_template = teacher_template
        self.instruction = instruction
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.student_prompt_format = student_prompt_format
        self.stats = {"teacher_prompts": 0, "teacher_middle_cut": 0}
        self._checked: dict[tuple[str, str], list[int]] = {}
        """(role, question) -> the ids `length_error` tokenised for a problem it accepted, taken
        (once) by `student_ids` ("student") and `teacher_ids` ("teacher without solution"): both
        depend on the question alone."""

    # -- text ------------------------------------------------------------------------------
    def student_message(self, problem) -> str:
        return self.student_template.format(question=problem.question, instruction=self.instruction)

    def teacher_message(self, problem, solution: str | None = None) -> str:
        solution = problem.solution if solution is None else solution
        return self.teacher_template.format(question=problem.question, solution=solution,
                                            instruction=self.instruction)

    def render(self, message: str, thinking: bool | None) -> str:
        """The chat-templated prompt text, generation prompt included."""
        messages = [{"role": "user", "content": message}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        extra = {} if thinking is None else {"enable_thinking": thinking}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **extra)

    def _encode(self, text: str) -> list[int]:
        # The chat template already holds every special token: add none.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- ids -------------------------------------------------------------------------------
    def student_text(self, problem) -> str:
        """The student's prompt text: chat-templated, or the bare message (``plain``)."""
        message = self.student_message(problem)
        if self.student_prompt_format == "plain":
            return message
        return self.render(message, self.student_thinking)

    def length_error(self, problem, *, teacher: bool = True) -> str | None:
        """Why ``problem`` cannot be prompted within ``max_prompt_tokens``, or None when it can:
        its student prompt is over the limit, or (``teacher``) its teacher prompt is over it
        with no reference solution at all (the solution is what shortening cuts). The check a
        loader's ``check`` runs on every row, so an over-long problem fails (or is skipped)
        when the data loads, before any model does (`opsd_kit.data.sources.load_source`)."""
        limit = self.max_prompt_tokens
        if not limit:
            return None
        checked = {"student": self._encode(self.student_text(problem))}
        n = len(checked["student"])
        if n > limit:
            return (f"the student prompt has {n} tokens (question: {len(problem.question)} characters), over "
                    f"max_prompt_tokens={limit}; raise the limit or skip such rows (on_invalid='skip')")
        if teacher:
            checked["teacher"] = self._empty_teacher_ids(problem)
            n = len(checked["teacher"])
            if n > limit:
                return (f"the teacher prompt needs {n} tokens without any reference solution, over "
                        f"max_prompt_tokens={limit}; raise the limit or skip such rows (on_invalid='skip')")
        for role, ids in checked.items():  # tokenised once: the prompt cache takes them (`student_ids`)
            self._checked[role, problem.question] = ids
        return None

    def forget_checked(self) -> None:
        """Drop the ids `length_error` kept that no prompt has taken."""
        self._checked.clear()

    def _empty_teacher_ids(self, problem) -> list[int]:
        """The teacher prompt with `TRUNCATION_MARK` for its solution (what shortening never cuts)."""
        ids = self._checked.pop(("teacher", problem.question), None)
        if ids is None:
            ids = self._encode(self.render(self.teacher_message(problem, TRUNCATION_MARK), self.teacher_thinking))
        return ids

    def student_ids(self, problem) -> list[int]:
        ids = self._checked.pop(("student", problem.question), None)
        if ids is None:
            ids = self._encode(self.student_text(problem))
        if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(
                f"problem {problem.id!r}: the student prompt has {len(ids)} tokens, over "
                f"max_prompt_tokens={self.max_prompt_tokens}; raise the limit or drop the problem")
        return ids

    def teacher_ids(self, problem, solution: str | None = None) -> list[int]:
        """The teacher prompt with ``solution`` as its hint (default: ``problem.solution``, the
        verified reference; a control run passes another problem's, see :func:`shuffled_hints`).
        An over-long prompt loses the middle of whichever solution it holds."""
        solution = problem.solution if solution is None else solution
        self.stats["teacher_prompts"] += 1
        ids = self._encode(self.render(self.teacher_message(problem, solution), self.teacher_thinking))
        limit = self.max_prompt_tokens
        if not limit or len(ids) <= limit:
            return ids
        self.stats["teacher_middle_cut"] += 1
        return self._shortened_teacher_ids(problem, solution, limit)

    def _shortened_teacher_ids(self, problem, solution: str, limit: int) -> list[int]:
        empty = self._empty_teacher_ids(problem)
        if len(empty) > limit:
            raise PromptTooLongError(
                f"problem {problem.id!r}: the teacher prompt needs {len(empty)} tokens without any "
                f"reference solution, over max_prompt_tokens={limit}; the problem and instruction "
                "are never cut: raise the limit or drop the problem")
        solution_ids = self._encode(solution)
        keep = min(len(solution_ids), limit - len(empty))
        while True:  # token boundaries can shift by a few ids after re-rendering
            text = middle_cut(self.tokenizer, solution_ids, keep)
            ids = self._encode(self.render(self.teacher_message(problem, text), self.teacher_thinking))
            if len(ids) <= limit or keep == 0:
                return ids
            keep = max(0, keep - max(1, len(ids) - limit))


def middle_cut(tokenizer, ids: list[int], keep: int) -> str:
    """``ids`` decoded with only ``keep`` of them: the first ``keep // 2`` and the last
    ``keep - keep // 2``, joined by :data:`TRUNCATION_MARK`. A reference solution's end holds
    its final answer; its beginning sets up the problem; the middle of the reasoning goes."""
    head = keep // 2
    tail = keep - head
    end = tokenizer.decode(ids[len(ids) - tail:]) if tail else ""
    return tokenizer.decode(ids[:head]) + TRUNCATION_MARK + end


def prompt_lengths(builder: PromptBuilder, problems, *, progress: bool = True) -> tuple[list[int], list[int]]:
    """Token counts of every problem's student and teacher prompt (what notebook 00 plots), with
    a progress bar: a large source takes a while to tokenise twice."""
    from tqdm.auto import tqdm

    student, teacher = [], []
    for problem in tqdm(problems, desc="prompt lengths", unit="problem", disable=not progress):
        student.append(len(builder.student_ids(problem)))
        teacher.append(len(builder.teacher_ids(problem)))
    return student, teacher


def build_prompts(config, tokenizer) -> PromptBuilder:
    """The PromptBuilder a run trains with, from its TrainConfig or its saved ``config.json`` dict.

    Reads the thinking switches, ``max_prompt_tokens``, the two templates, the instruction and
    the student's prompt format; a key missing from an older ``config.json`` takes this
    module's default.
    """
    values = config if isinstance(config, dict) else vars(config)
    return PromptBuilder(tokenizer, student_thinking=values.get("student_thinking"),
                         teacher_thinking=values.get("teacher_thinking"),
                         student_template=values.get("student_template", STUDENT_TEMPLATE),
                         teacher_template=values.get("teacher_template", TEACHER_TEMPLATE),
                         instruction=values.get("instruction", INSTRUCTION),
                         max_prompt_tokens=values.get("max_prompt_tokens"),
                         student_prompt_format=values.get("student_prompt_format", "chat"))


@dataclass
class PromptCache:
    """Every training problem's prompt ids, tokenised once (over-long prompts fail before training).

    ``teacher`` and ``wrong_teacher`` are empty when the algorithm has no teacher prompt, or no
    wrong-hint teacher (``divergence='hint_contrast'`` only)."""

    builder: PromptBuilder
    """The builder that rendered them (its ``stats`` count shortened teacher prompts)."""
    student: dict[str, list[int]]
    """Problem id -> student prompt ids."""
    teacher: dict[str, list[int]]
    """Problem id -> teacher prompt ids (with the reference solution, or the shuffled hint)."""
    wrong_teacher: dict[str, list[int]]
    """Problem id -> teacher prompt ids with another problem's solution as the hint."""

    @classmethod
    def build(cls, config, tokenizer, problems, *, teacher: bool, wrong_hints: dict[str, str] | None = None,
              builder: PromptBuilder | None = None):
        """The cache of a run's ``problems`` under ``config`` (a TrainConfig). ``teacher``: build the
        teacher prompts; ``wrong_hints`` (`shuffled_hints`): the teacher's hint when
        ``config.teacher_hint == 'shuffled'``, and the wrong teacher's when ``config.divergence ==
        'hint_contrast'``. ``builder``: the run's builder (`build_prompts` of ``config`` and
        ``tokenizer``) whose `PromptBuilder.length_error` checked the problems: the ids it
        tokenised are taken, not tokenised again (None: a new one)."""
        builder = builder or build_prompts(config, tokenizer)
        cache = cls(builder, {}, {}, {})
        for p in problems:
            cache.student[p.id] = builder.student_ids(p)
            if teacher:
                hint = wrong_hints[p.id] if config.teacher_hint == "shuffled" else None
                cache.teacher[p.id] = builder.teacher_ids(p, hint)
                if config.divergence == "hint_contrast":
                    cache.wrong_teacher[p.id] = builder.teacher_ids(p, wrong_hints[p.id])
        builder.forget_checked()
        return cache

    @property
    def teacher_middle_cut(self) -> int:
        """How many teacher prompts lost the middle of their reference solution to fit
        ``max_prompt_tokens``."""
        return self.builder.stats["teacher_middle_cut"]


def shuffled_hints(problems, seed: int) -> dict[str, str]:
    """Wrong hints for a control run: problem id -> another problem's reference solution.

    The assignment is a derangement (no problem gets its own solution) and, whenever the
    answers allow it, no problem gets a solution whose answer equals its own (answers compared
    by `opsd_kit.data.problems.answer_key`: ``1,000`` and ``1000`` are one answer). It depends
    only on ``problems`` and ``seed``; build it once per run. Construction: problems in a seeded
    random order, grouped by answer with the largest group first, each mapped to the one ``m``
    places further round the circle (``m`` = the largest group's size). When ``m <= n / 2`` no
    problem meets its own answer; otherwise exactly ``2 m - n`` (the fewest possible) do. Raises
    ValueError, naming a problem, when no two problems have different answers.
    """
    import random

    from opsd_kit.data.problems import answer_key

    problems = list(problems)
    if len({answer_key(str(p.answer)) for p in problems}) < 2:
        if len(problems) < 2:
            found = f"only {len(problems)} problem" + (f" ({problems[0].id!r})" if problems else "s")
        else:
            found = (f"all {len(problems)} problems, problem {problems[0].id!r} among them, have the answer "
                     f"{problems[0].answer!r}")
        raise ValueError(f"a shuffled hint needs at least 2 problems with different answers; got {found}")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(answer_key(str(problems[i].answer)), []).append(i)
    circle = [i for group in sorted(groups.values(), key=len, reverse=True) for i in group]
    shift = len(max(groups.values(), key=len))
    return {problems[circle[k]].id: problems[circle[(k + shift) % len(circle)]].solution
            for k in range(len(circle))}


@dataclass
class Batch:
    """Rows ``[pads | prompt | completion | pads]``, each row's tokens contiguous.

    Prompts are left-padded to a common width ``prompt_width`` (P) and completions
    right-padded to ``C``, so every row's completion starts at column P. The hidden state
    that predicts completion token j sits at column ``P - 1 + j`` in every row and for every
    role: student and teacher batches line up on the same ``[B, C]`` grid.
    """

    input_ids: "torch.Tensor"  # noqa: F821  [B, P + C]
    attention_mask: "torch.Tensor"  # noqa: F821  [B, P + C]
    position_ids: "torch.Tensor"  # noqa: F821  [B, P + C], 0 at each row's first real token
    completion_ids: "torch.Tensor"  # noqa: F821  [B, C], right-padded with pad ids
    completion_mask: "torch.Tensor"  # noqa: F821  [B, C], 1 on real completion tokens
    prompt_width: int
    shared_prefix: int = 0
    """How many leading prompt tokens every row has in common (`shared_prefix_length`)."""

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                              self.completion_ids, self.completion_mask)),
                     prompt_width=self.prompt_width, shared_prefix=self.shared_prefix)

    def predicting_slice(self, prefix_removed: bool = False) -> slice:
        """Columns whose hidden states predict the completion tokens; ``prefix_removed``: in the
        rows without their shared prefix (`columns_after_prefix`)."""
        c = self.completion_ids.shape[1]
        last_prompt = self.prompt_width - 1 - (self.shared_prefix if prefix_removed else 0)
        return slice(last_prompt, last_prompt + c)


def position_ids(attention_mask_BT):
    """Each column's position: 0 at a row's first real token, counting real tokens (as ``generate``
    numbers a left-padded batch; padding columns get 0 and are masked anyway)."""
    return (attention_mask_BT.cumsum(-1) - 1).clamp(min=0)


def shared_prefix_length(prompt_ids: list[list[int]]) -> int:
    """How many leading tokens all prompts have in common (a system turn, a chat header, a task's
    fixed wording), leaving every prompt at least its last token; 0 for a single prompt. Those
    columns can run once for all rows (`policy.Policy.hidden_sharing_prefix`)."""
    if len(prompt_ids) < 2:
        return 0
    limit = min(len(p) for p in prompt_ids) - 1
    first = prompt_ids[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompt_ids):
        n += 1
    return n


def first_real_column(attention_mask_BT, prompt_width: int):
    """Each left-padded row's first real column: ``[B, 1]``."""
    return prompt_width - attention_mask_BT[:, :prompt_width].sum(-1, keepdim=True)


def columns_after_prefix(attention_mask_BT, prompt_width: int, prefix: int):
    """Per row, the index of every column but the row's first ``prefix`` real prompt tokens, in
    order: ``[B, T - prefix]`` (a left-padded row ``[pads | prefix | rest]`` read as ``[pads | rest]``)."""
    import torch

    start_B1 = first_real_column(attention_mask_BT, prompt_width)
    j_W = torch.arange(attention_mask_BT.shape[1] - prefix, device=attention_mask_BT.device)
    return j_W + prefix * (j_W >= start_B1)


def left_padded_columns(attention_mask_BT, prompt_width: int, prefix: int):
    """Per row, where each column of the left-padded layout ``[pads | prefix | rest]`` sits in the
    layout ``[prefix | pads | rest]`` (`Policy.hidden_sharing_prefix`'s cache): ``[B, T]``, the
    inverse of `columns_after_prefix` with the prefix put first."""
    import torch

    start_B1 = first_real_column(attention_mask_BT, prompt_width)
    j_T = torch.arange(attention_mask_BT.shape[1], device=attention_mask_BT.device)
    return torch.where(j_T < start_B1, prefix + j_T, torch.where(j_T < start_B1 + prefix, j_T - start_B1, j_T))


def build_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> Batch:
    """Build a contiguous batch of ``prompt ++ completion`` rows (see :class:`Batch`)."""
    import torch

    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise ValueError(f"build_batch needs equally many prompts and completions, got "
                         f"{len(prompt_ids)} and {len(completion_ids)}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("build_batch: every prompt needs at least one token")
    width_p = max(len(p) for p in prompt_ids)
    width_c = max(1, max(len(c) for c in completion_ids))
    b = len(prompt_ids)
    input_ids = torch.full((b, width_p + width_c), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros((b, width_c), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, width_p - len(p): width_p] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width_p - len(p): width_p + len(c)] = 1
        if c:
            input_ids[i, width_p: width_p + len(c)] = torch.tensor(c, dtype=torch.long)
            completion_mask[i, : len(c)] = 1
    return Batch(input_ids, attention_mask, position_ids(attention_mask), input_ids[:, width_p:].clone(),
                 completion_mask, width_p, shared_prefix_length(prompt_ids))
