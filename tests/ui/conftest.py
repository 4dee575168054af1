"""The browser fixture of the UI tests: one headless Chromium per test; when the test fails,
what the browser showed (screenshot and page source) is saved in the test's tmp_path/failure."""
from __future__ import annotations

import pytest

from tests.ui.browser import chrome, dump


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def driver(request, tmp_path):
    with chrome() as browser:
        yield browser
        report = getattr(request.node, "report_call", None)
        if report is None or report.failed:
            dump(browser, tmp_path / "failure", "page")
            print(f"browser state at failure: {tmp_path / 'failure'}")
