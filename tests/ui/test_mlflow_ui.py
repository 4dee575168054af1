"""The MLflow UI as forja's users drive it, in a real headless Chromium against the stack of
`make up`: compare the training runs of two registered versions (their train_loss and val_loss
curves on one chart), then move `champion` by hand in the registry page; `forja models` sees
the move and `forja rollback` returns to the version that was champion before it."""
from __future__ import annotations

import time

import pytest

from tests.ui.browser import click, shoot, text, visible, wait
from tests.ui.registry import MODEL, champion, challenger, forja, mlflow_client, models

pytestmark = pytest.mark.slow

# What the MLflow UI keeps in the browser: its telemetry notice read, the assistant panel and
# the registry's promotion dialog closed, the "Model training" navigation chosen.
QUIET = {"mlflow.telemetry.info.alert.dismissed_v1": "true", "mlflow.assistant.panelOpen_v1": "false",
         "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
         "_mlflow_model_registry_promo_modal_dismissed_v1": "true",
         "mlflow.workflowType_v1": '"machine_learning"'}


def _open(driver, uri: str) -> None:
    """MLflow's home page with the first-visit notices already dismissed."""
    driver.get(uri)
    for key, value in QUIET.items():
        driver.execute_script("localStorage.setItem(arguments[0], arguments[1])", key, value)
    driver.get(uri)


def _close_assistant(driver) -> None:
    """Close MLflow's assistant side panel when a page opened it (it narrows the page)."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, "//*[normalize-space()='MLflow Assistant']/following::button[@aria-label='Close']"):
        if button.is_displayed():
            button.click()
            return


def _training_runs(stack) -> list:
    """The MLflow runs that registered the two newest versions (their pretraining runs), oldest first."""
    client = mlflow_client(stack)
    versions = sorted(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))[-2:]
    runs = [client.get_run(v.run_id) for v in versions]
    for run in runs:
        if "train_loss" not in run.data.metrics or "val_loss" not in run.data.metrics:
            raise ValueError(f"run {run.info.run_name} of {MODEL} logged no train_loss/val_loss: {sorted(run.data.metrics)}")
    return runs


def _select_run(driver, run_name: str) -> None:
    from selenium.webdriver.common.by import By

    row = visible(driver, (By.XPATH, f"//*[@role='row'][.//a[contains(normalize-space(), '{run_name}')]]"))
    box = row.find_element(By.XPATH, ".//input[@type='checkbox']")
    box.click()
    wait(driver, 10).until(lambda _: box.is_selected(), f"the run {run_name} did not get selected")


def _metric_link(driver, metric: str):
    """The compare page's link to a metric's chart. Its metrics table is a virtual grid that
    renders the rows in view only: scroll it with the mouse wheel, as a person does, until the
    metric's row shows."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By

    visible(driver, text("*", "Show diff only"))
    grids = driver.find_elements(By.XPATH, "//*[normalize-space()='Metrics']/following::div[contains(@class, 'ReactVirtualized__Grid')]")
    scrolling = [g for g in grids if driver.execute_script("return getComputedStyle(arguments[0]).overflowY", g) == "auto"]
    if not scrolling:
        raise AssertionError("the compare page shows no scrollable metrics table")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", scrolling[0])
    link = f"//a[normalize-space()='{metric}' and contains(@href, 'metric')]"
    for _ in range(60):
        shown = [a for a in driver.find_elements(By.XPATH, link) if a.is_displayed()]
        if shown:
            return shown[0]
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(scrolling[0]), 0, 120).perform()
        time.sleep(0.2)  # let the grid render the rows scrolled into view
    raise AssertionError(f"no {metric} row in the compare page's metrics table")


def _plot_both(driver, metrics: list[str]) -> None:
    """The chart page with these Y-axis metrics, as the page itself records them in its URL
    (`plot_metric_keys`), for when the Y-axis picker was re-rendered under the pointer."""
    import json
    import re
    from urllib.parse import quote

    keys = "plot_metric_keys=" + quote(json.dumps(metrics, separators=(",", ":")))
    url = driver.current_url
    url = re.sub(r"plot_metric_keys=[^&]*", keys, url) if "plot_metric_keys=" in url else f"{url}&{keys}"
    driver.get(url)
    driver.refresh()
    _close_assistant(driver)


def test_compare_training_runs_and_hand_promotion_rolled_back(stack, service_runs, driver, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC

    runs = _training_runs(stack)
    names = [run.info.run_name for run in runs]
    assert len(set(names)) == 2, f"two training runs with distinct names expected, got {names}"
    _open(driver, stack.mlflow_uri)

    # Experiments -> forja-test -> select both training runs -> Compare
    click(driver, text("a", "Experiments"))
    click(driver, (By.XPATH, f"//a[normalize-space()='{MODEL}' and contains(@href, '/experiments/')]"))
    for name in names:
        _select_run(driver, name)
    click(driver, text("button", "Compare"))
    visible(driver, text("*", "Comparing 2 Runs from 1 Experiment"))
    for name in names:
        visible(driver, text("td", name))
    # The compare page's metrics table links each metric to its chart of both runs.
    _close_assistant(driver)
    _metric_link(driver, "train_loss").click()
    visible(driver, text("*", "Y-axis:"))
    _close_assistant(driver)
    axis = visible(driver, (By.XPATH, "//*[normalize-space()='Y-axis:']/following::*[contains(@class, 'select-selector')][1]"))
    axis.click()
    axis.find_element(By.XPATH, ".//input").send_keys("val_loss")  # filters the long list of metrics
    click(driver, (By.XPATH, "//*[contains(@class, 'select-item-option')][@title='val_loss']"))
    axis.find_element(By.XPATH, ".//input").send_keys(Keys.ESCAPE)
    try:
        visible(driver, text("*", "train_loss vs val_loss"), timeout=15)
    except TimeoutException:  # the picker lost train_loss (a side panel re-rendered it): say both in the URL
        _plot_both(driver, ["train_loss", "val_loss"])
        visible(driver, text("*", "train_loss vs val_loss"))
    for name in names:  # one solid and one dashed curve per run, named in the legend
        for metric in ("train_loss", "val_loss"):
            visible(driver, text("span", f"{name} ({metric})"))
    shoot(driver, tmp_path, "mlflow-compare", publish=True)

    # Registry: forja-test -> the version that is not champion -> edit its aliases -> champion
    before, target = champion(stack), challenger(stack)
    assert before is not None, f"{MODEL} has no champion after the weekly runs"
    click(driver, text("a", "Model registry"))
    click(driver, (By.XPATH, f"//a[normalize-space()='{MODEL}' and contains(@href, '/models/')]"))
    click(driver, text("a", f"Version {target}"))
    visible(driver, text("*", f"Version {target}"))
    aliases = "//*[@data-testid='descriptions-item'][.//*[normalize-space()='Aliases']]"
    click(driver, (By.XPATH, f"{aliases}//button[@title='Edit aliases' or normalize-space()='Add']"))
    dialog = visible(driver, (By.XPATH, "//*[@role='dialog'][.//*[contains(normalize-space(), 'alias for model version')]]"))
    field = dialog.find_element(By.XPATH, ".//input[@role='combobox']")
    field.send_keys("champion")
    visible(driver, (By.XPATH, "//*[contains(@class, 'select-item-option')][@title='champion']"))
    field.send_keys(Keys.ENTER)
    # The dialog warns that the alias leaves the current champion.
    visible(driver, text("*", f'The "champion" alias is also being used on version {before}.', exact=False))
    shoot(driver, tmp_path, "mlflow-alias", publish=True)
    click(driver, text("button", "Save aliases"))
    wait(driver).until(EC.invisibility_of_element(dialog), "the alias dialog did not close")
    visible(driver, (By.XPATH, f"{aliases}//*[normalize-space()='@\u00a0champion' or normalize-space()='@ champion']"))
    wait(driver).until(lambda _: champion(stack) == target, "the registry never got the UI's alias")

    # forja sees the hand move, and rolls back to the champion before it.
    rows = {row["version"]: row["aliases"] for row in models(stack)}
    assert "champion" in rows[int(target)] and "champion" not in rows[int(before)], rows
    out = forja(stack, "rollback", MODEL)
    assert f"champion {target} -> {before}" in out, out
    assert champion(stack) == before
    rows = {row["version"]: row["aliases"] for row in models(stack)}
    assert "champion" in rows[int(before)] and "champion" not in rows[int(target)], rows
