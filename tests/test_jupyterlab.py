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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on a free local port over ``tmp_path``; stopped by its PID."""
    from opsd_kit.demo import notebook_dir

    (tmp_path / "notebooks").mkdir()
    shutil.copy(notebook_dir() / "00_data_prep.ipynb", tmp_path / "notebooks")
    # JupyterLab 4 renders only the cells in view; render them all, so that every prompt can be read
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp_path}", "--allow-root"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
             "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings")})
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


def test_notebook_00_runs_all_cells_in_jupyterlab(jupyterlab, tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{jupyterlab}/lab/tree/notebooks/00_data_prep.ipynb?token={TOKEN}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=120_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            code_cells = page.locator(".jp-Notebook .jp-CodeCell")
            n_code = code_cells.count()
            deadline = time.monotonic() + 300
            while True:  # every code cell numbered ("[3]:"): none waiting ("[ ]") or running ("[*]")
                prompts = code_cells.locator(".jp-InputPrompt").all_inner_texts()
                if len(prompts) == n_code and all(p.strip()[1:-2].strip().isdigit() for p in prompts):
                    break
                assert time.monotonic() < deadline, f"cells did not finish: {prompts}"
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
