"""Packaging: environment.yml pins agree with pyproject.toml; the package imports light."""
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(3)
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _pins(project["dependencies"] + project["optional-dependencies"]["dev"]
                   + project["optional-dependencies"]["bench"] + project["optional-dependencies"]["notebooks"])
    env_lines = [line.strip().lstrip("- ") for line in (ROOT / "environment.yml").read_text().splitlines()]
    got = _pins(env_lines)
    # torch: a floor in pyproject (a runtime's own torch is kept); the pin is what `make install` puts first
    torch_pin = re.search(r"pip install -q torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert got.pop("torch") == torch_pin
    assert "torch" not in wanted and any(d.startswith("torch>=") for d in project["dependencies"])
    assert got == wanted
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_import_is_light():
    code = "import sys, opsd_kit; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_notebook_tools_are_an_extra():
    """`pip install opsd_kit` installs no notebook server; `.[notebooks]` (the Makefile's install) does."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    notebook_tools = {"jupyterlab", "ipykernel", "papermill", "ipywidgets"}
    assert not notebook_tools & set(_pins(project["dependencies"]))
    assert notebook_tools <= set(_pins(project["optional-dependencies"]["notebooks"]))
    assert project["scripts"]["opsd-kit"] == "opsd_kit.apps.cli:main"
    assert '".[dev,bench,notebooks]"' in (ROOT / "Makefile").read_text()


def test_library_imports_without_the_notebook_tools():
    """Importing every module works with papermill, IPython and ipywidgets unimportable."""
    code = ("import sys; sys.modules.update(dict.fromkeys(('papermill', 'IPython', 'ipywidgets', 'jupyterlab'))); "
            "import pkgutil, importlib, opsd_kit; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(opsd_kit.__path__, 'opsd_kit.')]; "
            "from opsd_kit.apps.demo import _papermill\n"
            "try:\n    _papermill()\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'opsd_kit[notebooks]'" in out.stdout


def test_gpu_extras_are_lazy():
    code = ("import sys, opsd_kit.rollout.sampler, opsd_kit.policy, opsd_kit.trainer; "
            "print([m for m in ('vllm', 'unsloth') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


_BNB_NOTICE = "Failed to load CPU gemm_4bit_forward"


def _bnb_notice_expected() -> bool:
    """Whether importing bitsandbytes logs its kernel notice here (CPUs with AVX-512 BF16 and no
    `kernels` package); elsewhere the tests below hold trivially."""
    code = "import logging, bitsandbytes"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return _BNB_NOTICE in out.stderr


def test_cpu_runs_without_4bit_print_no_bitsandbytes_notice():
    """Importing the kit and loading a model (peft and transformers import bitsandbytes) prints
    nothing about bitsandbytes' optional 4-bit CPU kernel."""
    code = ("from opsd_kit.policy import Policy; import peft, transformers; "
            "Policy.from_pretrained('tiny', device='cpu')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert _BNB_NOTICE not in out.stderr and "kernels-community" not in out.stderr


def test_a_4bit_cpu_model_says_once_what_the_notice_means():
    code = ("from opsd_kit.models import load_causal_lm\n"
            "for _ in range(2):\n    load_causal_lm('tiny', dtype='bfloat16', quantization='4bit')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert _BNB_NOTICE not in out.stderr
    assert out.stderr.count("4-bit on CPU: bitsandbytes computes") == (1 if _bnb_notice_expected() else 0)
