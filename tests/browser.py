"""A real browser for the tests of pages: Debian's headless Chromium driven through its chromedriver by
selenium, offline (no driver download). Tests that need it are skipped, saying why, where it is absent;
.ci/run installs it."""

from __future__ import annotations

import shutil

import pytest


def chromium():
    """A headless Chromium session (1400 x 1000), or a skip that names what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)
