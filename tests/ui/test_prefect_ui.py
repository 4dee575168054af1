"""The Prefect UI as forja's users drive it, in a real headless Chromium against the stack of
`make up`: start the `promote` deployment from its "Custom run" form with changed parameters,
watch the run reach Completed, then read a stage's counts table among a weekly run's artifacts."""
from __future__ import annotations

import json
import time

import pytest

from tests.ui.browser import click, shoot, text, type_into, visible, wait
from tests.ui.registry import MODEL, champion, challenger, forja, prefect_api

pytestmark = pytest.mark.slow


def _ui(stack) -> str:
    return stack.prefect_api_url.removesuffix("/api")


def _parameter_input(driver, name: str):
    """The input (or textarea) of a deployment parameter, found by its label in the run form."""
    from selenium.webdriver.common.by import By

    label = f"//label[starts-with(normalize-space(), '{name} (') or normalize-space()='{name}']"
    return visible(driver, (By.XPATH, f"({label}/following::*[self::input or self::textarea])[1]"))


def _typed(driver, name: str, value: str) -> None:
    """Type into a parameter's input and wait until it holds the value (a re-render while the
    form loads can drop keystrokes; a person would see it and type again)."""
    def holds(_):
        element = _parameter_input(driver, name)
        if element.get_attribute("value") == value:
            return True
        type_into(element, value)
        return element.get_attribute("value") == value

    wait(driver).until(holds, f"the {name} input does not keep {value!r}")


def _form_messages(driver) -> list[str]:
    """What the run form says is wrong: field messages and toasts."""
    found = driver.find_elements("xpath", "//*[contains(@class, 'p-label__message') or contains(@class, 'p-toast__card ')"
                                          " or @class='p-toast__card']")
    return [e.text.strip() for e in found if e.is_displayed() and e.text.strip()]


def _submit(driver, stack, run_name: str, attempts: int = 3, wait_s: float = 20) -> None:
    """Submit the run form as a person does, and wait until the run exists and the page has left
    the form. When no run was made, Submit is clicked again, at most `attempts` times in all: the
    click was lost, or the server answered 503. Prefect's SQLite database answers 503 ("Service
    Unavailable", retryable) to a write that meets another one, here the worker's poll, which marks
    the deployment ready; Prefect's own clients retry those, the UI shows its "Oops" toast instead.
    What the page showed and the browser's console go into the failure."""
    from selenium.common.exceptions import WebDriverException

    runs = {"flow_runs": {"name": {"any_": [run_name]}}}
    seen = []
    for _ in range(attempts):
        click(driver, text("button", "Submit"))
        deadline = time.monotonic() + wait_s
        while not (made := bool(prefect_api(stack, "flow_runs/filter", runs))) and time.monotonic() < deadline:
            time.sleep(0.5)
        if made:
            wait(driver, 60).until(lambda _: not driver.current_url.split("?")[0].endswith("/run"),
                                   f"run {run_name} was made but the page stayed on the form")
            return
        seen.append({"page": _form_messages(driver), "console": [e["message"] for e in driver.get_log("browser")]})
        print(f"Submit made no run {run_name!r}: {seen[-1]}", flush=True)
        for close in driver.find_elements("xpath", "//*[contains(@class, 'p-toast__close-btn')]"):
            try:
                close.click()  # toasts over the footer would take the next click
            except WebDriverException:  # hidden, or already gone with its toast
                pass
    pytest.fail(f"{attempts} clicks on Submit made no run {run_name!r}; what each left: {seen}")


def test_custom_run_of_promote_then_a_stage_counts_table(stack, service_runs, driver, tmp_path):
    before, target = champion(stack), challenger(stack)
    assert before is not None, f"{MODEL} has no champion after the weekly runs"
    ui = _ui(stack)
    promote = prefect_api(stack, "deployments/name/forja-promote/promote")

    # Deployments page -> promote -> Run -> Custom run
    driver.get(f"{ui}/deployments")
    click(driver, text("a", "promote"))
    visible(driver, text("*", "forja-promote"))
    click(driver, text("button", "Run"))
    click(driver, text("button", "Custom run"))
    visible(driver, text("*", "Parameters"))
    _typed(driver, "model_name", MODEL)
    _typed(driver, "version", target)
    run_name = _parameter_input(driver, "Run Name").get_attribute("value")
    assert run_name, "the Custom run form proposed no run name"
    shoot(driver, tmp_path, "prefect-run-form", publish=True)
    _submit(driver, stack, run_name)

    # Back on the deployment page the new run is listed by its name; its page follows it
    # (Scheduled, Pending, Running ... Completed) and shows forja's own log line.
    click(driver, text("a", run_name), timeout=60)
    wait(driver).until(lambda _: "/runs/flow-run/" in driver.current_url, "the run's link opened no flow run page")
    run_id = driver.current_url.split("/runs/flow-run/")[1].split("?")[0]
    visible(driver, text("*[contains(@class, 'state-badge')]", "Completed"), timeout=240)
    visible(driver, text("*", f"{MODEL}: champion {before} -> {target}", exact=False), timeout=60)
    shoot(driver, tmp_path, "prefect-flow-run", publish=True)

    # The API agrees: the run had the changed parameters, and the champion moved.
    run = prefect_api(stack, f"flow_runs/{run_id}")
    assert run["state_type"] == "COMPLETED" and run["deployment_id"] == promote["id"]
    assert run["parameters"]["model_name"] == MODEL and int(run["parameters"]["version"]) == int(target)
    assert champion(stack) == target, f"the promote run completed but champion is {champion(stack)}, not {target}"

    # A weekly run's artifacts: the crawl stage's counts table, as the API holds it.
    weekly = service_runs.runs[0].id
    [counts] = prefect_api(stack, "artifacts/filter", {"artifacts": {"key": {"any_": ["crawl-counts"]},
                                                                     "flow_run_id": {"any_": [str(weekly)]}}})
    expected = {row["metric"]: row["value"] for row in json.loads(counts["data"])}
    assert expected["counts.fetched"] > 0
    driver.get(f"{ui}/runs/flow-run/{weekly}")
    click(driver, text("li", "Artifacts"))
    # Task runs' artifacts are a virtual list: it renders its cards once scrolled into view.
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", visible(driver, text("*", "Task runs")))
    click(driver, ("xpath", "//a[.//*[normalize-space()='crawl-counts']]"))
    fetched = visible(driver, text("tr", "counts.fetched", exact=False))
    cells = [c.text.strip() for c in fetched.find_elements("xpath", "./td")]
    assert cells == ["counts.fetched", str(expected["counts.fetched"])], cells
    documents = visible(driver, text("tr", "documents", exact=False))
    assert documents.find_elements("xpath", "./td")[1].text.strip() == str(expected["documents"])
    shoot(driver, tmp_path, "prefect-crawl-counts", publish=True)

    # Put the registry back as the weekly runs left it, for whatever runs next.
    forja(stack, "rollback", MODEL)
    assert champion(stack) == before
