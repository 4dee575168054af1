"""A headless Chromium driven by Selenium, for the tests that use the Prefect and MLflow UIs.

Debian's `chromium` and `chromium-driver` (make system-deps) are used as installed: nothing is
downloaded. Waits are explicit and elements are found by what a person reads (visible text,
labels, aria labels), so a restyled page does not break the tests, a changed workflow does.

    with chrome() as driver:
        driver.get(url)
        click(driver, text("button", "Run"))
        shoot(driver, tmp_path, "prefect-run")   # also copied to $FORJA_SCREENSHOTS when set
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH, HEIGHT = 1400, 900
WAIT_S = 30


def _require(path: str, package: str) -> str:
    found = path if os.access(path, os.X_OK) else shutil.which(Path(path).name)
    if not found:
        raise RuntimeError(f"{path} is missing: install the Debian package {package} (`make system-deps`)")
    return found


@contextmanager
def chrome() -> Iterator:
    """A headless Chromium with a fixed 1400x900 viewport (so screenshots are the same size
    everywhere); always quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _require(CHROMIUM, "chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WIDTH},{HEIGHT}", "--lang=en-US", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for dump()
    driver = webdriver.Chrome(service=Service(_require(CHROMEDRIVER, "chromium-driver")), options=options)
    try:
        # The window size includes no browser frame in new headless mode, but pin the viewport anyway.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


def wait(driver, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25)


def _literal(value: str) -> str:
    """`value` as an XPath string literal (concat() when it holds both kinds of quote)."""
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    return "concat(" + ", '\"', ".join(f'"{part}"' for part in value.split('"')) + ")"


def text(tag: str, value: str, exact: bool = True) -> tuple[str, str]:
    """A locator for a `tag` element (`*` for any) whose visible text is (or contains) `value`."""
    from selenium.webdriver.common.by import By

    test = f"normalize-space()={_literal(value)}" if exact else f"contains(normalize-space(), {_literal(value)})"
    return By.XPATH, f"//{tag}[{test}]"


def aria(tag: str, label: str) -> tuple[str, str]:
    """A locator for a `tag` element with this aria-label."""
    from selenium.webdriver.common.by import By

    return By.XPATH, f"//{tag}[@aria-label={_literal(label)}]"


def visible(driver, locator: tuple[str, str], timeout: float = WAIT_S):
    """The first visible element the locator finds, waiting for it."""
    from selenium.webdriver.support import expected_conditions as EC

    return wait(driver, timeout).until(EC.visibility_of_element_located(locator),
                                       f"nothing visible matches {locator[1]} on {driver.current_url}")


def click(driver, locator: tuple[str, str], timeout: float = WAIT_S):
    """Find the element, scroll it into view and click it, finding it again while the page
    re-renders it (stale) or something still covers it (an animation, a closing toast)."""
    from selenium.common.exceptions import (ElementClickInterceptedException, ElementNotInteractableException,
                                            StaleElementReferenceException)
    from selenium.webdriver.support.ui import WebDriverWait

    def clicked(_):
        element = next((e for e in driver.find_elements(*locator) if e.is_displayed() and e.is_enabled()), None)
        if element is None:
            return False
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        element.click()
        return element

    retry = (StaleElementReferenceException, ElementClickInterceptedException, ElementNotInteractableException)
    return WebDriverWait(driver, timeout, poll_frequency=0.25, ignored_exceptions=retry).until(
        clicked, f"nothing clickable matches {locator[1]} on {driver.current_url}")


def type_into(element, value: str) -> None:
    """Replace an input's content the way a person does (select all, type), so the page's
    framework sees the input events."""
    from selenium.webdriver.common.keys import Keys

    element.click()
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(value)


def shoot(driver, folder: Path, name: str, publish: bool = False) -> Path:
    """Save a PNG of the viewport as folder/NAME.png; with `publish`, also copy it to the folder
    named by $FORJA_SCREENSHOTS (relative to the repository root), where the README's images live."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    target = os.environ.get("FORJA_SCREENSHOTS")
    if publish and target:
        out = Path(target) if Path(target).is_absolute() else ROOT / target
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / path.name)
    return path


def dump(driver, folder: Path, name: str) -> None:
    """A screenshot, the page source and its console, to see what the browser saw when a test failed."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        driver.save_screenshot(str(folder / f"{name}.png"))
        (folder / f"{name}.html").write_text(f"<!-- {driver.current_url} -->\n{driver.page_source}")
        (folder / f"{name}.console.txt").write_text("".join(f"{e['level']} {e['message']}\n"
                                                            for e in driver.get_log("browser")))
    except Exception as e:  # the browser itself may be what failed
        (folder / f"{name}.error.txt").write_text(f"could not capture the page: {e!r}")
