"""The chat page at / in headless Chromium (Debian's chromium + chromium-driver, driven by selenium): type a
message, watch the answer stream in, clear the history. Saves test-artifacts/chat_page.png.

Skips, saying why, when chromium, chromedriver or selenium is absent (scripts/install-browser.sh installs the
browser; selenium is a dev extra)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import serve_helpers

from tunesmith.model.generate import generate_reply

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium is not installed (run scripts/install-browser.sh: apt-get install chromium "
    "chromium-driver)",
)

live_server = serve_helpers.live_server_fixture()

QUESTION = "What is the capital of France?"
MAX_TOKENS = 48

# Counts how often the reply's text changes while it streams in (a reply set once would count 1).
COUNT_UPDATES = """
window.replyUpdates = 0;
new MutationObserver(() => {
  const replies = document.querySelectorAll('.msg.assistant .content');
  if (replies.length && replies[replies.length - 1].textContent) window.replyUpdates += 1;
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev extra: pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--window-size=1100,760",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # An explicit driver path: selenium must not go looking for (downloading) one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_chat_page_streams_an_answer(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = generate_reply(
        live_server.model,
        live_server.tokenizer,
        live_server.template,
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}],
        max_new_tokens=MAX_TOKENS,
    )
    browser.get(live_server.base_url + "/")
    wait = WebDriverWait(browser, 30)
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(live_server.api_key)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-qwen2")

    browser.find_element(By.ID, "system").send_keys("Answer briefly.")
    for field, value in (("temperature", "0"), ("max-tokens", str(MAX_TOKENS))):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.execute_script(COUNT_UPDATES)
    browser.find_element(By.ID, "input").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "ready"
               and d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "chat_page.png"))
    user = browser.find_elements(By.CSS_SELECTOR, ".msg.user .content")
    reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")
    assert [u.get_attribute("textContent") for u in user] == [QUESTION]
    assert [r.get_attribute("textContent") for r in reply] == [expected]
    assert browser.execute_script("return window.replyUpdates") >= 2, "the answer did not stream in pieces"

    browser.find_element(By.ID, "clear").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".msg"))
    assert browser.find_element(By.ID, "status").text == "history cleared"
