"""Export: a trained tiny adapter merged into a plain transformers folder gives the trained
policy's logits; the adapter export names its base by public id; the card says what was trained."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from opsd_kit import models
from opsd_kit.apps.export import export, main
from opsd_kit.config import load_profile
from opsd_kit.run.card import update_card
from opsd_kit.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny OPSD run of one step: (trainer, its final adapter folder)."""
    run_dir = tmp_path_factory.mktemp("run")
    trainer = Trainer(load_profile("tiny", "opsd", run_dir=str(run_dir), max_steps=1, progress=False))
    result = trainer.train()
    return trainer, result.adapter_dir


def test_merged_export_loads_in_plain_transformers_with_the_trained_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, adapter = trained
    out = export(adapter, tmp_path / "merged", merge=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["What is 2 + 3?"], return_tensors="pt").input_ids
    policy = trainer.policy
    policy.model.eval()
    with torch.no_grad():
        expected = policy.model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]
    cache = str(models.cache_dir())
    assert not any(cache in f.read_text() for f in out.glob("*.json"))
    assert (out / "generation_config.json").is_file() and (out / "README.md").is_file()
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM" in card and "library_name: transformers" in card and "algorithm: `opsd`" in card


def test_adapter_export_names_the_public_base_and_carries_the_card(trained, tmp_path):
    trainer, adapter = trained
    out = export(adapter, tmp_path / "adapter", merge=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"
    assert str(models.cache_dir()) not in (out / "adapter_config.json").read_text()
    card = (out / "README.md").read_text()
    assert "base_model: tiny" in card and str(models.cache_dir()) not in card
    for needle in ("algorithm: `opsd`", "divergence: `forward_kl`", "teacher: `frozen`", "optimizer steps: 1",
                   "train_data: `reasoning_gym:chain_sum`", "problems: 16", "```json",
                   f"generated (rollout) tokens: {trainer.ledger.generated_tokens}",
                   f"training (loss) tokens: {trainer.ledger.train_tokens}", "Policy.from_pretrained('tiny'"):
        assert needle in card, needle
    with pytest.raises(FileExistsError, match="not empty"):
        export(adapter, out, merge=False)


def test_merging_into_a_4bit_base_is_refused_unless_reloaded_unquantised(trained, tmp_path):
    _, adapter = trained
    four_bit = shutil.copytree(adapter, tmp_path / "a4")
    base = json.loads((four_bit / models.ADAPTER_BASE_FILE).read_text())
    (four_bit / models.ADAPTER_BASE_FILE).write_text(json.dumps(dict(base, quantization="4bit")))
    with pytest.raises(ValueError, match="4-bit base.*bf16 or fp32"):
        export(four_bit, tmp_path / "refused", merge=True)
    assert main([str(four_bit), str(tmp_path / "ok"), "--merge", "--dtype", "float32"]) == 0
    assert (tmp_path / "ok" / "config.json").is_file()


def test_public_model_id():
    assert models.public_model_id("tiny") == "tiny"
    assert models.public_model_id(models.resolve_model_path("tiny")) == "tiny"
    assert models.public_model_id(models.BUNDLED) == models.BUNDLED_HUB_ID
    assert models.public_model_id(str(models.cache_dir() / "smollm2-135m-instruct-v1")) == models.BUNDLED_HUB_ID
    assert models.public_model_id("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"


def test_update_card_replaces_or_appends_a_section(tmp_path):
    (tmp_path / "README.md").write_text("# t\n\n## Data\n\nold\n\n## Tokens\n\n- 3\n")
    update_card(tmp_path, "Data", "new data")
    update_card(tmp_path, "Evaluation", "| acc |\n|---|\n| 0.5 |")
    update_card(tmp_path, "Evaluation", "acc 0.6")
    text = (tmp_path / "README.md").read_text()
    assert text == "# t\n\n## Data\n\nnew data\n\n## Tokens\n\n- 3\n\n## Evaluation\n\nacc 0.6\n"
    with pytest.raises(FileNotFoundError):
        update_card(tmp_path / "missing", "Data", "x")


def test_the_cards_load_lines_run_for_a_tiny_run(trained, monkeypatch):
    """Every Python block of the card's Usage section loads the adapter, run from the run folder
    (a tiny base has no hub id: `AutoPeftModelForCausalLM` cannot fetch it)."""
    import re

    _, adapter = trained
    card = (adapter / "README.md").read_text()
    usage = card[card.index("## Usage"):]
    blocks = re.findall(r"```python\n(.*?)```", usage, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(adapter.parent)
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "card", "exec"), scope)
        loaded = scope.get("model") or scope["policy"].model
        assert any("lora_" in name for name, _ in loaded.named_parameters())
