"""A real headless Chromium for the page tests, driven by Selenium through Debian's chromedriver.

Chromium gets a fresh profile and the flags that keep it off the network (the sandbox has none
and it would keep trying); Selenium is handed the driver's path so Selenium Manager never runs
(it would try to download one). Without Chromium the page tests skip, except under CI=true,
where they fail: `.ci/browser` installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars", "--force-device-scale-factor=1",
)


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    binary = chromium_binary()
    if binary and os.access(CHROMEDRIVER, os.X_OK):
        return binary
    message = "the page tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true: {message}; .ci/browser installs them")
    pytest.skip(message)


@contextmanager
def chromium(profile: Path, *, width: int = 1400, height: int = 1100) -> Iterator[Any]:
    """A headless Chromium with a fresh profile in `profile`; quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = require_chromium()
    options = Options()
    options.binary_location = binary
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float = 180, what: str = "the page") -> Any:
    """Poll `condition(driver)` until it is truthy (bounded); the failure shows what the page said."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page rebuilds what changed (the running job every second): an element found a moment ago
    # may be gone when it is read, so a stale one just means "look again".
    ignored = (NoSuchElementException, StaleElementReferenceException)
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=ignored).until(condition)
    except TimeoutException:
        body = driver.execute_script("return document.body ? document.body.innerText : ''")
        raise AssertionError(f"timed out waiting for {what}; the page shows:\n{body[:3000]}") from None
