"""The dashboard in a real browser: headless Debian Chromium driven by Playwright (no browser download).

Skipped, with the reason printed, only where /usr/bin/chromium or the playwright package is absent
(`apt-get install -y chromium`, `pip install playwright`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from alignkit.ui.server import serve
from tests.conftest import write_jsonl
from tests.test_ui_server import DPO_ROWS, SFT_ROWS, write_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = ("Chromium is not installed (apt-get install -y chromium)" if CHROMIUM is None else
           "playwright is not installed (pip install playwright)" if importlib.util.find_spec("playwright") is None
           else None)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"browser tests skipped: {MISSING}")

ROWS = [{"prompt": "Hello", "completion": "hello there"}, {"prompt": "Add 12 and 30.", "completion": "42"}]
LOSS_BLUE = (0x1F, 0x77, 0xB4)  # the first series colour of the page
DPO_RED = (0xD6, 0x27, 0x28)  # the second


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def site(tmp_path, browser):
    """(page, runs folder) with a finished SFT run and a resumable DPO run, served on a free port."""
    root = tmp_path / "runs"
    write_run(root / "sft-a", SFT_ROWS, {"model": "m", "max_steps": 4}, {"final_loss": 1.4, "steps": 4})
    dpo = write_run(root / "dpo-b", DPO_ROWS, {"model": "m", "beta": 0.1, "max_steps": 100})
    (dpo / "checkpoints").mkdir()
    (dpo / "checkpoints" / "latest").write_text("step-6")
    (dpo / "run.pid").write_text("999999999")
    server = serve(root, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server.url())  # with ?token=, which the page keeps and sends with every request
    yield page, root
    page.close()
    server.shutdown()
    server.server_close()


def colour_pixels(page, selector: str, rgb: tuple[int, int, int]) -> int:
    """Pixels of the canvas painted in exactly this colour (the lines; axes and text use greys)."""
    return page.evaluate("""([selector, rgb]) => {
        const canvas = document.querySelector(selector);
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < data.length; i += 4)
            if (data[i] === rgb[0] && data[i + 1] === rgb[1] && data[i + 2] === rgb[2] && data[i + 3] === 255) n++;
        return n;
    }""", [selector, list(rgb)])


def status_of(page, run: str) -> str:
    return page.get_attribute(f'tr[data-run="{run}"]', "data-status")


def test_the_run_list_shows_each_run_with_its_status(site):
    page, _ = site
    page.wait_for_selector('tr[data-run="dpo-b"]')
    assert status_of(page, "sft-a") == "finished" and status_of(page, "dpo-b") == "resumable"
    assert page.inner_text('tr[data-run="dpo-b"]').split() == ["dpo-b", "dpo", "resumable", "6", "/", "100"]


def test_the_page_keeps_the_token_out_of_its_address_and_a_tab_without_it_is_told_why(site, browser):
    page, _ = site
    page.wait_for_selector('tr[data-run="dpo-b"]')
    page.reload()  # the token is kept for the tab, not in the address bar
    page.wait_for_selector('tr[data-run="dpo-b"]')
    assert "token" not in page.url
    stranger = browser.new_page()
    try:
        stranger.goto(page.url)  # the same address, but no token in this tab
        stranger.wait_for_selector("#auth-error:has-text('token')")
        assert stranger.query_selector('tr[data-run="dpo-b"]') is None
    finally:
        stranger.close()


def test_a_chart_draws_the_fixture_run_and_two_runs_compare_on_one_chart(site):
    page, _ = site
    page.click('tr[data-run="sft-a"]')
    page.wait_for_selector('canvas[data-title="Loss"]')
    assert page.get_attribute('canvas[data-title="Loss"]', "data-points") == "5"  # 4 training rows + 1 eval
    assert colour_pixels(page, 'canvas[data-title="Loss"]', LOSS_BLUE) > 100
    assert colour_pixels(page, 'canvas[data-title="Loss"]', DPO_RED) > 0  # eval/loss, one point
    page.wait_for_selector('pre[data-file="summary.json"]:has-text("final_loss")')
    page.click('tr[data-run="dpo-b"]')
    page.wait_for_selector('canvas[data-title="DPO reward margins"]')
    assert colour_pixels(page, 'canvas[data-title="DPO rewards"]', DPO_RED) > 100  # rewards/rejected
    page.check('tr[data-run="sft-a"] input[type=checkbox]')
    page.check('tr[data-run="dpo-b"] input[type=checkbox]')
    page.click("#compare")
    page.wait_for_function("document.querySelector('#compare-chart').dataset.points === '10'")  # 4 + 6 loss rows
    assert colour_pixels(page, "#compare-chart", LOSS_BLUE) > 100 and colour_pixels(page, "#compare-chart",
                                                                                    DPO_RED) > 100


def fill_form(page, name: str, model: str, data: str, **values: str) -> None:
    page.click("#new-run")
    page.wait_for_selector("#form input[name=lr][placeholder]")
    page.fill("#form input[name=name]", name)
    page.fill("#form input[name=model]", model)
    page.fill("#form textarea[name=data]", data)
    for field, value in values.items():
        page.fill(f"#form [name={field}]", value)


def test_a_bad_value_in_the_form_shows_the_cli_error(site, tmp_path):
    page, root = site
    data = str(write_jsonl(tmp_path / "rows.jsonl", ROWS))
    fill_form(page, "bad", "m", data, lr="fast")
    page.click("#check")
    page.wait_for_selector("#form-error:has-text('must')")
    assert page.inner_text("#form-error") == "form: 'lr' must be a number, got 'fast'"
    page.fill("#form input[name=lr]", "1e-4")
    page.select_option("#form select[name=method]", "dpo")
    page.fill("#form input[name=beta]", "0")
    page.click("#check")
    page.wait_for_selector("#form-error:has-text('beta')")
    assert page.inner_text("#form-error") == "'beta' must be > 0, got 0.0"
    assert not (root / "bad").exists()


def test_a_run_launched_from_the_page_appears_and_finishes(site, tmp_path, tiny_model_dir):
    page, root = site
    data = str(write_jsonl(tmp_path / "rows.jsonl", ROWS))
    fill_form(page, "tiny", str(tiny_model_dir), data, max_steps="3", batch_size="1", max_length="64",
              extra="dtype: fp32\nsave_steps: 0\nlr_scheduler: constant")
    page.click("#start")
    page.wait_for_selector('tr[data-run="tiny"]')
    page.wait_for_selector('tr[data-run="tiny"][data-status="finished"]', timeout=90_000)
    page.wait_for_function("document.querySelector('canvas[data-title=\"Loss\"]')?.dataset.points === '3'")
    # "finished" is summary.json; the exit code is recorded once the process has exited, a second or two later
    # (torch's teardown; more with deepspeed installed, which accelerate imports when it unwraps the model)
    deadline = time.time() + 60
    while '"ended"' not in (record := (root / "tiny" / "launch.json").read_text()):  # "ended" is written last
        assert time.time() < deadline, "the run's process did not exit"
        time.sleep(0.1)
    assert json.loads(record)["returncode"] == 0
    assert json.loads((root / "tiny" / "summary.json").read_text())["steps"] == 3
    # the run's data view: the training rows with their trained text shaded, the completion and end of turn only
    page.wait_for_selector("#data span.trained")
    trained = page.eval_on_selector_all("#data pre", "pres => pres.map(p => [...p.querySelectorAll('span.trained')]"
                                        ".map(s => s.textContent).join(''))")
    assert sorted(trained) == ["42<|im_end|>", "hello there<|im_end|>"]
    assert page.inner_text("#data p").startswith("2 training rows,")


def test_stop_sends_sigint_so_the_run_saves_and_can_resume(site, tmp_path, tiny_model_dir):
    page, root = site
    data = str(write_jsonl(tmp_path / "rows.jsonl", ROWS))
    fill_form(page, "long", str(tiny_model_dir), data, max_steps="100000", batch_size="1", max_length="64",
              extra="dtype: fp32\nsave_steps: 0")
    page.click("#start")
    page.wait_for_function("Number(document.querySelector('canvas[data-title=\"Loss\"]')?.dataset.points) > 0",
                           timeout=90_000)
    page.click("#stop")
    page.wait_for_selector('tr[data-run="long"][data-status="resumable"]', timeout=60_000)
    assert json.loads((root / "long" / "launch.json").read_text())["returncode"] == 130
    assert (root / "long" / "checkpoints" / "latest").is_file()
    assert "Run the same command with --resume" in Path(root / "long" / "launch.log").read_text()
    page.wait_for_selector("#resume:not(.hidden)")
