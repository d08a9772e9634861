"""Where a run's weights come from: ``init_adapter`` (start from another run's adapter) and the
record of which problems every run in that chain trained on.

`resolve_init_adapter` reads small files only (the adapter's ``adapter_config.json``, the base
record `models.ADAPTER_BASE_FILE`, the init run's ``config.json``), so it runs before any model
loads and refuses an adapter of another model or LoRA layout. The trainer loads the adapter into
a fresh run only; a resumed run loads its own checkpoint.

Every run writes `TRAINED_ON` (each training problem's id and a hash of its normalised
question, `data.splits.normalise_question`), so that a held-out set can be checked against the
problems of the run and of every run it started from (`lineage_leakage`): a warm-up's training
problems leak into a held-out set as surely as the run's own.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from opsd_kit.config import ConfigError

TRAINED_ON = "trained_on.json"
"""A run folder's record of its training problems: ``{"n": N, "problems": [[id, sha256], ...]}``."""
MAX_DEPTH = 32
"""How many init adapters `lineage` follows back before it calls the chain a loop."""


@dataclass(frozen=True)
class InitAdapter:
    """The adapter a run starts from and the run that trained it (None: a bare adapter folder)."""

    adapter_dir: Path
    run_dir: Path | None
    run_config: dict | None


def resolve_init_adapter(config) -> InitAdapter:
    """``config.init_adapter`` as an `InitAdapter`: a run folder (its final ``adapter/``) or an
    adapter folder (``adapter_config.json``; its run is the nearest folder above holding a
    ``config.json``, if any). Raises ConfigError when it is missing, unfinished, or of another
    model or LoRA layout than ``config``."""
    path = Path(config.init_adapter)
    where = f"init_adapter={config.init_adapter!r}"
    if (path / "adapter_config.json").is_file():
        adapter, run_dir = path, next((p for p in path.resolve().parents if (p / "config.json").is_file()), None)
    elif (path / "config.json").is_file():
        adapter, run_dir = path / "adapter", path.resolve()
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(f"{where}: run folder {path} has no final adapter (it has not finished); name one of "
                              "its checkpoints' adapter folders (checkpoints/step-NNNNNN/adapter) instead")
    else:
        raise ConfigError(f"{where}: {path} is neither a run folder (config.json) nor an adapter folder "
                          "(adapter_config.json)")
    saved = _read_json(adapter / "adapter_config.json", where)
    want = {"r": config.lora_r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.lora_target_modules)}
    have = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
            "target_modules": sorted(saved.get("target_modules") or [])}
    if have != want:
        raise ConfigError(f"{where}: the adapter has LoRA settings {have}, this run {want}; set lora_r, lora_alpha "
                          "and lora_target_modules as the init run had them")
    from opsd_kit.models import ADAPTER_BASE_FILE

    base_file = adapter / ADAPTER_BASE_FILE
    run_config = _read_json(run_dir / "config.json", where) if run_dir is not None else None
    trained_model = (_read_json(base_file, where).get("model") if base_file.is_file()
                     else (run_config or {}).get("model"))
    if trained_model is not None and trained_model != config.model:
        raise ConfigError(f"{where}: the adapter was trained on model {trained_model!r}, this run uses "
                          f"{config.model!r}; an adapter only fits the model it was trained on")
    return InitAdapter(adapter.resolve(), run_dir, run_config)


def lineage(config) -> list[dict]:
    """The runs ``config`` starts from, nearest first: per run its ``run_dir`` (None for a bare
    adapter), ``adapter``, ``algorithm``, ``train_data``, ``train_size`` and ``seed`` (as its
    config.json says; None when unknown). Empty without ``init_adapter``."""
    chain, seen, current = [], set(), config
    while current is not None and current.init_adapter:
        if len(chain) >= MAX_DEPTH:
            raise ConfigError(f"init_adapter chains back more than {MAX_DEPTH} runs from {config.run_dir}: a loop?")
        init = resolve_init_adapter(current)
        if init.adapter_dir in seen:
            raise ConfigError(f"init_adapter chain of {config.run_dir} loops back to {init.adapter_dir}")
        seen.add(init.adapter_dir)
        c = init.run_config or {}
        chain.append({"run_dir": None if init.run_dir is None else str(init.run_dir), "adapter": str(init.adapter_dir),
                      **{k: c.get(k) for k in ("algorithm", "train_data", "train_size", "seed")}})
        current = _parent_config(init)
    return chain


def _parent_config(init: InitAdapter):
    """The init run's own config (to follow its init_adapter), or None for a bare adapter."""
    if init.run_config is None or not init.run_config.get("init_adapter"):
        return None
    from opsd_kit.config import TrainConfig

    return TrainConfig.from_saved(init.run_config)


def question_hash(question: str) -> str:
    """sha256 of the normalised question (`data.splits.normalise_question`)."""
    from opsd_kit.data.splits import normalise_question

    return hashlib.sha256(normalise_question(question).encode()).hexdigest()


def write_trained_on(run_dir, problems) -> Path:
    """Record ``problems`` (the run's training problems) in ``run_dir``/`TRAINED_ON`."""
    path = Path(run_dir) / TRAINED_ON
    path.write_text(json.dumps({"n": len(problems), "problems": [[p.id, question_hash(p.question)]
                                                                 for p in problems]}) + "\n")
    return path


def lineage_leakage(run_dir, evals) -> list[dict]:
    """Held-out problems ``evals`` found among the training problems of the run in ``run_dir``
    and of every run it started from (by id or normalised question; `TRAINED_ON`). One row per
    run: ``run_dir``, ``recorded`` (False: the run wrote no record, so it is unchecked),
    ``shared_ids``, ``shared_questions`` (eval ids whose normalised question it trained on)."""
    from opsd_kit.config import TrainConfig

    config = TrainConfig.from_saved(_read_json(Path(run_dir) / "config.json", f"run {run_dir}"))
    runs = [str(Path(run_dir).resolve())] + [r["run_dir"] for r in lineage(config)]
    eval_ids = {p.id for p in evals}
    by_hash: dict[str, list[str]] = {}
    for p in evals:
        by_hash.setdefault(question_hash(p.question), []).append(p.id)
    rows = []
    for folder in runs:
        record = None if folder is None else Path(folder) / TRAINED_ON
        if record is None or not record.is_file():
            rows.append({"run_dir": folder, "recorded": False, "shared_ids": [], "shared_questions": []})
            continue
        trained = json.loads(record.read_text())["problems"]
        rows.append({"run_dir": folder, "recorded": True,
                     "shared_ids": sorted({i for i, _ in trained} & eval_ids),
                     "shared_questions": sorted({e for _, h in trained for e in by_hash.get(h, [])})})
    return rows


def _read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: {path} cannot be read ({err})") from err
