"""Take a trained adapter elsewhere: a clean adapter folder, or a merged full model.

``python -m opsd_kit.apps.export ADAPTER OUT [--merge] [--dtype bfloat16] [--push-to-hub ID]``

- ``merge=False``: OUT holds the adapter weights, adapter_config.json naming the base by its
  public id (`opsd_kit.models.public_model_id`, never a cache folder) and the card (README.md).
- ``merge=True``: the base is loaded as in training (`opsd_kit.models.ADAPTER_BASE_FILE`), the LoRA is
  merged into its weights (peft ``merge_and_unload``) and OUT is a plain transformers folder
  (model, tokenizer, generation config, card) for ``vllm serve OUT`` or
  ``AutoModelForCausalLM.from_pretrained(OUT)``. A base trained in 4-bit is refused: merging
  into 4-bit weights would round the update away; reload it unquantised with ``dtype=``.
- ``push_to_hub="user/name"`` uploads OUT with huggingface_hub (needs network and a token; not
  exercised by the tests).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from opsd_kit.config import DTYPES
from opsd_kit.models import ADAPTER_BASE_FILE, kit_model_name, load_causal_lm, load_tokenizer, public_model_id
from opsd_kit.run.card import CARD, update_card, write_card

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def export(adapter_dir, out_dir, *, merge: bool, push_to_hub: str | None = None,
           dtype: str | None = None) -> Path:
    """Export the adapter in ``adapter_dir`` to ``out_dir`` (see the module doc); returns ``out_dir``.

    dtype: with ``merge=True``, load the base unquantised in this dtype (``"float32"``,
    ``"bfloat16"``, ``"float16"``) instead of as in training; needed for an adapter trained on a
    4-bit base.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not an adapter folder: no adapter_config.json")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export folder {out_dir} exists and is not empty; choose a new one")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = _base(adapter_dir, json.loads(config_file.read_text()))
    if merge:
        _export_merged(adapter_dir, out_dir, base, dtype)
    else:
        _export_adapter(adapter_dir, out_dir, base)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=str(out_dir), repo_id=push_to_hub)
    return out_dir


def _base(adapter_dir: Path, adapter_config: dict) -> dict:
    """How the base was loaded in training: ADAPTER_BASE_FILE when the kit wrote the adapter, else the
    base named in adapter_config.json, unquantised float32."""
    if (adapter_dir / ADAPTER_BASE_FILE).is_file():
        return json.loads((adapter_dir / ADAPTER_BASE_FILE).read_text())
    named = adapter_config.get("base_model_name_or_path")
    if not named:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    return {"model": kit_model_name(named), "base_model": public_model_id(named), "dtype": "float32",
            "quantization": None}


def _export_adapter(adapter_dir: Path, out_dir: Path, base: dict) -> None:
    weights = next((adapter_dir / f for f in _ADAPTER_FILES if (adapter_dir / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{adapter_dir} has no adapter weights ({' or '.join(_ADAPTER_FILES)})")
    shutil.copy2(weights, out_dir / weights.name)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base["base_model"]
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_card(adapter_dir, out_dir, base)


def _export_merged(adapter_dir: Path, out_dir: Path, base: dict, dtype: str | None) -> None:
    from peft import PeftModel

    quantization = None if dtype else base.get("quantization")
    model = load_causal_lm(base["model"], dtype=dtype or base.get("dtype") or "float32", quantization=quantization)
    merged = merge_adapter(PeftModel.from_pretrained(model, str(adapter_dir)))
    merged.config.name_or_path = base["base_model"]
    merged.save_pretrained(out_dir)
    load_tokenizer(base["model"]).save_pretrained(out_dir)
    _copy_card(adapter_dir, out_dir, base)
    card = out_dir / CARD  # the card of a full model, not of a peft adapter
    card.write_text(card.read_text().replace("library_name: peft\n", "library_name: transformers\n", 1))
    update_card(out_dir, "Usage", f"The LoRA adapter merged into {base['base_model']} (a full model):\n\n```python\n"
                f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"model = AutoModelForCausalLM.from_pretrained({out_dir.name!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({out_dir.name!r})\n```\n\n"
                f"or serve it: `vllm serve {out_dir.name}`")


def merge_adapter(peft_model):
    """The base model with the LoRA merged into its weights (peft ``merge_and_unload``).

    Refuses a 4-bit base: merging into NF4 weights re-quantises them and loses the update.
    """
    if getattr(peft_model.get_base_model(), "is_loaded_in_4bit", False):
        raise ValueError("cannot merge a LoRA adapter into a 4-bit base model: the merged weights would be "
                         "re-quantised and the update largely lost. Reload the base in bf16 or fp32 to merge "
                         "(export(..., merge=True, dtype='bfloat16') or --dtype bfloat16), or export the adapter "
                         "alone (merge=False)")
    return peft_model.merge_and_unload()


def _copy_card(adapter_dir: Path, out_dir: Path, base: dict) -> None:
    if (adapter_dir / CARD).is_file():
        shutil.copy2(adapter_dir / CARD, out_dir / CARD)
    else:
        write_card(out_dir, base["base_model"], model=base.get("model"))


def add_export_options(parser) -> None:
    """The options after the adapter: OUT, ``--merge``, ``--dtype``, ``--push-to-hub`` (this
    module's command and ``opsd-kit export`` share them)."""
    parser.add_argument("out", help="new export folder")
    parser.add_argument("--merge", action="store_true", help="merge the LoRA into the base: a full model folder")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="with --merge: load the base unquantised in this dtype (needed for 4-bit runs)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the export to this hub repo")


def main(argv: list[str] | None = None) -> int:
    """``python -m opsd_kit.apps.export ADAPTER OUT [--merge] [--dtype D] [--push-to-hub ID]``."""
    parser = argparse.ArgumentParser(prog="python -m opsd_kit.apps.export", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="adapter folder (a run's adapter/ or a checkpoint's)")
    add_export_options(parser)
    args = parser.parse_args(argv)
    out = export(args.adapter, args.out, merge=args.merge, push_to_hub=args.push_to_hub, dtype=args.dtype)
    print(f"exported {'merged model' if args.merge else 'adapter'} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
