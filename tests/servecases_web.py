"""The web page in the system's headless Chromium, against the running application of ``test_serve.py``
(which imports these tests, so that they share its module-scoped ``base`` fixture): generate images, an
API error shown on the page, and a swap grid."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import requests
from test_model_version import ANATOMY, STYLE

__all__ = ["test_page_generates_shows_api_errors_and_draws_a_grid"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "sudo apt-get install chromium chromium-driver (Debian/Ubuntu)"
WAIT_S = 60


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must run the browser test: {INSTALL}")
    pytest.skip(f"{message}; install them with: {INSTALL}")


@contextlib.contextmanager
def _chromium() -> Iterator[Any]:
    """Headless Chromium through the system's chromedriver (nothing is downloaded)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        _unavailable(f"the browser test needs {' and '.join(missing)}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("the browser test needs selenium (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def _script_errors(driver: Any) -> list[str]:
    """The console's errors, less the network errors of the API's refusals (the test causes a 422)."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]


def _until(browser: Any, condition: Any, what: str, *, error_ends: bool = True) -> Any:
    """Wait up to WAIT_S for ``condition``; fail saying what the page shows on a timeout, or as soon as
    the page shows an error (unless the error is what is awaited: ``error_ends=False``)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(driver: Any) -> Any:
        if error_ends and driver.find_element(By.ID, "error").is_displayed():
            return "error"
        return condition(driver)

    try:
        result = WebDriverWait(browser, WAIT_S).until(done)
    except TimeoutException:
        result = None
    if result is not None and result != "error":
        return result
    shown = browser.execute_script(
        "const t = (id) => { const e = document.getElementById(id); return e ? e.innerText : null; };"
        "return {error: t('error'), status: t('status'), grid_status: t('grid-status'),"
        " model: t('model')};"
    )
    logs = [e["message"] for e in browser.get_log("browser")]
    how = "showed an error instead of" if result == "error" else f"did not show in {WAIT_S} s"
    pytest.fail(f"the page {how} {what}; it shows {shown}; console: {logs}")


def _type(driver: Any, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    if text:
        field.send_keys(text)


def _loaded(driver: Any, selector: str) -> bool:
    """An image matched by ``selector`` has been decoded (a PNG the browser could read)."""
    return driver.execute_script(
        "const img = document.querySelector(arguments[0]);"
        "return !!img && img.complete && img.naturalWidth > 0;",
        selector,
    )


def test_page_generates_shows_api_errors_and_draws_a_grid(base: str) -> None:
    models = requests.get(f"{base}/v1/models", timeout=30).json()["models"]
    with _chromium() as browser:
        _use_page(base, browser, models)


def _use_page(base: str, browser: Any, models: list[dict[str, Any]]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{base}/")
    _until(browser, lambda d: d.find_element(By.ID, "model").is_enabled(), "the models")
    select = Select(browser.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in select.options] == [m["name"] for m in models]
    assert select.first_selected_option.get_attribute("value") == models[0]["name"]
    steps = browser.find_element(By.ID, "steps").get_attribute("placeholder")
    assert steps == str(models[0]["sampler"]["num_steps"])

    # Generate: one image with seed 3, shown with its seed, a download link and the model's version.
    _type(browser, "anatomy", ANATOMY[0])
    _type(browser, "style", STYLE[0])
    _type(browser, "seed", "3")
    browser.find_element(By.ID, "generate").click()
    _until(browser, lambda d: _loaded(d, '#images img[src^="data:image/png;base64,"]'), "an image")
    assert browser.find_element(By.CSS_SELECTOR, "#images .seed").text == "3"
    link = browser.find_element(By.CSS_SELECTOR, "#images a[download]")
    assert link.get_attribute("download") == f"vgmedgen_{models[0]['name']}_seed3.png"
    assert models[0]["version_id"][:12] in browser.find_element(By.ID, "result-info").text
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.find_element(By.ID, "generate").is_enabled()

    # A style prompt without an anatomy prompt: the page sends it, the API refuses it (422) and the
    # page shows the API's own message.
    refusal = requests.post(
        f"{base}/v1/generate", json={"style_prompt": STYLE[0], "seed": 3, "n": 1}, timeout=30
    )
    assert refusal.status_code == 422, refusal.text
    message = refusal.json()["error"]
    assert "anatomy_prompt" in message
    _type(browser, "anatomy", "")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    _until(browser, lambda d: error.is_displayed() and "422" in error.text, "the 422", error_ends=False)
    assert message in error.text

    # The grid: two anatomy prompts x one style prompt, drawn as one PNG (the error box is cleared).
    browser.find_element(By.ID, "tab-grid").click()
    _type(browser, "grid-anatomy", f"{ANATOMY[0]}\n{ANATOMY[1]}")
    _type(browser, "grid-style", STYLE[0])
    _type(browser, "grid-seed", "3")
    browser.find_element(By.ID, "grid-generate").click()
    _until(browser, lambda d: _loaded(d, "#grid-image"), "the grid")
    assert browser.find_element(By.ID, "grid-image").get_attribute("src").startswith("blob:")
    assert not browser.find_element(By.ID, "error").is_displayed()
    download = browser.find_element(By.ID, "grid-download").get_attribute("download")
    assert download == f"vgmedgen_{models[0]['name']}_grid_seed3.png"
    assert _script_errors(browser) == []
