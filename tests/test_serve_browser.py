"""The chat page at `GET /` in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by `.ci/run`) driven by Selenium loads the page, sends a message and
sees the reply stream in; the reply equals the API's greedy answer to the same conversation.
Skipped when Chromium, its driver or Selenium is missing."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest
from test_serve import ServerProcess, save_served_model

KEY = "browser-key"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="chromium and chromium-driver are not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    folder = save_served_model(tmp_path_factory.mktemp("browser") / "tiny")
    srv = ServerProcess(folder, tmp_path_factory.mktemp("log") / "server.log", "--threads", "1", "--api-key", KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_chat_page_streams_a_reply(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "API key" in d.find_element(By.ID, "model").text)  # /v1/models refused without the key
    browser.find_element(By.ID, "toggle-settings").click()
    for field, value in (("api-key", KEY), ("temperature", "0"), ("max-tokens", "24")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "input").click()  # leaving the fields fires their change events
    wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-test")  # now /v1/models answers
    browser.find_element(By.ID, "input").send_keys("Bonjour! How are you?")
    browser.find_element(By.ID, "send").click()

    reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
    wait.until(lambda d: reply.get_attribute("data-state") != "streaming")
    assert reply.get_attribute("data-state") == "done"
    chunks = int(reply.get_attribute("data-chunks"))
    text = browser.execute_script("return arguments[0].querySelector('.text').textContent", reply)

    # The same conversation through the API, greedily: the page showed exactly that reply.
    req = urllib.request.Request(server.url + "/v1/chat/completions", method="POST",
                                 data=json.dumps({"messages": [{"role": "user", "content": "Bonjour! How are you?"}],
                                                  "max_tokens": 24, "temperature": 0}).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        expected = json.load(r)["choices"][0]["message"]["content"]
    assert text == expected and chunks > 1, (text, expected, chunks)  # streamed in several pieces
    assert "24 tokens" in reply.find_element(By.CSS_SELECTOR, ".stats").text
    user = browser.find_element(By.CSS_SELECTOR, ".msg.user .text").text
    assert user == "Bonjour! How are you?"
