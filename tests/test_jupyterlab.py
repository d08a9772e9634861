"""Notebook 00 in JupyterLab itself, driven by a real headless browser: the interface researchers
use, not papermill. Needs `playwright` (the `dev` extra) and a Chromium (Debian: `apt install
chromium`); skipped where either is missing, run by `make test` where both are."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt install chromium)")]

TOKEN = "opsd-kit-test"
#: Where JupyterLab and the Jupyter server write for a user (workspaces, settings, the notebook
#: signatures database, the runtime files): the test's server writes under its tmp_path instead.
USER_FOLDERS = ("~/.jupyter", "~/.local/share/jupyter")


def _snapshot() -> dict:
    """Every file under `USER_FOLDERS` with its size and modification time."""
    out = {}
    for folder in USER_FOLDERS:
        for root, _, files in os.walk(os.path.expanduser(folder)):
            for name in files:
                path = os.path.join(root, name)
                try:
                    info = os.stat(path)
                except FileNotFoundError:
                    continue
                out[path] = (info.st_size, info.st_mtime_ns)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on a free local port over ``tmp_path``, with its own configuration,
    data, runtime, settings and workspaces folders under ``tmp_path`` (nothing of the user's is
    read or written); stopped by its PID."""
    from opsd_kit.apps.demo import notebook_dir

    (tmp_path / "notebooks").mkdir()
    shutil.copy(notebook_dir() / "00_data_prep.ipynb", tmp_path / "notebooks")
    # JupyterLab 4 renders only the cells in view; render them all, so that every prompt can be read
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp_path}", "--allow-root",
         f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
             "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data-dir"),
             "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
             "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError as err:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start on port {port} (exit code {server.poll()})") from err
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _dismiss_dialogs(page) -> None:
    """Accept any modal dialog JupyterLab opened (e.g. a kernel choice), so the menu can be used."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count():
        dialog.locator(".jp-mod-accept").first.click()
        dialog.first.wait_for(state="detached", timeout=30_000)


@pytest.fixture
def user_folders_untouched():
    """Fails the test if a file under `USER_FOLDERS` was created, changed or removed meanwhile
    (another JupyterLab running as the same user at the same time would also trip it)."""
    before = _snapshot()
    yield
    after = _snapshot()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"the test wrote into the user's Jupyter folders: {changed}"


def test_notebook_00_runs_all_cells_in_jupyterlab(user_folders_untouched, jupyterlab, tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{jupyterlab}/lab/tree/notebooks/00_data_prep.ipynb?token={TOKEN}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
            idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            idle.wait_for(timeout=120_000)
            # the notebook's code cells, from the file: the page attaches its cells progressively, so
            # counting them right after the first one appears can come up short (a fresh-clone CI run did)
            notebook = json.loads((tmp_path / "notebooks" / "00_data_prep.ipynb").read_text())
            n_code = sum(cell["cell_type"] == "code" for cell in notebook["cells"])
            page.wait_for_function(f"document.querySelectorAll('.jp-Notebook .jp-CodeCell').length >= {n_code}",
                                   timeout=120_000)
            code_cells = page.locator(".jp-Notebook .jp-CodeCell")

            def prompts() -> list[str]:  # "[ ]:" not run, "[*]:" waiting or running, "[3]:" done
                return [p.strip() for p in code_cells.locator(".jp-InputPrompt").all_inner_texts()]

            for _ in range(3):  # a click that lands while the page is still settling starts nothing
                _dismiss_dialogs(page)
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
                started = time.monotonic() + 30
                while time.monotonic() < started and not any(p != "[ ]:" for p in prompts()):
                    time.sleep(0.5)
                if any(p != "[ ]:" for p in prompts()):
                    break
                idle.wait_for(timeout=60_000)
            deadline = time.monotonic() + 300
            while True:  # every code cell numbered: none waiting or running
                now = prompts()
                if len(now) == n_code and all(p[1:-2].strip().isdigit() for p in now):
                    break
                if time.monotonic() > deadline:
                    page.screenshot(path=str(tmp_path / "jupyterlab.png"), full_page=True)
                    raise AssertionError(f"cells did not finish (screenshot {tmp_path / 'jupyterlab.png'}): {now}")
                time.sleep(1)
            stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert not [t for t in stderr.all_inner_texts() if "Error" in t or "Traceback" in t]
            assert "Traceback" not in page.locator(".jp-Notebook").inner_text()
            bar = page.locator(".jp-OutputArea-output.lm-Panel", has_text="prompt lengths")  # tqdm.auto's widget
            assert bar.count() == 1 and "100%" in bar.inner_text()
            assert page.locator(".jp-RenderedImage img").count() >= 1  # the prompt-length figure
        finally:
            browser.close()
    report = json.loads((tmp_path / "data" / "processed" / "data_report.json").read_text())
    assert report["n_train"] > 0 and report["n_eval"] == 100
    assert list((tmp_path / "workspaces").glob("*.jupyterlab-workspace"))  # JupyterLab saved its layout here
