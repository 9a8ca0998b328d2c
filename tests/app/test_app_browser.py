"""The page in a real browser: headless Chromium driven through WebDriver (selenium) uploads an example,
generates, both 3D viewers draw their scene, and releasing the scale slider re-runs the LoRA side only. Skipped, with the reason, without Chromium or its driver
(Debian: ``apt-get install chromium chromium-driver``; browsers are not downloaded at test time).

The screenshot is kept as an artifact: in ``$MIDI_TEST_ARTIFACTS`` when set, else in the test's tmp_path.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from app_cases import GRADIO_MISSING, SMALL
from PIL import Image

pytest.importorskip("gradio", reason=GRADIO_MISSING)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-app.txt)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="needs headless Chromium and chromedriver (apt-get install chromium chromium-driver)"),
]
CLEAR = np.array([245, 245, 245])  # the viewer's clear colour (0.96 grey)


def wait_for(find, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = find()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # SwiftShader: WebGL without a GPU, so the viewer (Babylon.js) really draws the model.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1150",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    # The driver is given explicitly: otherwise selenium-manager would try to download one.
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def drawn_share(element) -> float:
    """Share of an element's pixels that are not the viewer's clear colour (0: nothing drawn)."""
    pixels = np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"), np.int16)
    return float((np.abs(pixels - CLEAR).max(axis=-1) > 12).mean())


def test_upload_generate_and_see_both_scenes_in_3d(browser, server, studio, example, lora, tmp_path):
    browser.get(server)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#rgb-file input[type=file]"), 60, "the page")
    browser.find_element(By.CSS_SELECTOR, "#rgb-file input[type=file]").send_keys(str(example[0]))
    browser.find_element(By.CSS_SELECTOR, "#seg-file input[type=file]").send_keys(str(example[1]))
    wait_for(lambda: "2 instances" in browser.find_element(By.ID, "status").text, 60, "the inputs to be read")
    box = browser.find_element(By.CSS_SELECTOR, "#lora input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(lora), Keys.ENTER)  # a typed path (the dropdown takes custom values)
    browser.find_element(By.ID, "generate").click()

    shares = {}
    for side, glb in (("base", f"{SMALL}-base.glb"), ("lora", f"{SMALL}-lora.glb")):
        link = wait_for(lambda s=side: browser.find_elements(By.CSS_SELECTOR, f"#view-{s} [data-testid=model3d-download-link]"),
                        180, f"the {side} scene")[0]
        assert link.get_attribute("href").endswith(glb)
        viewer = browser.find_element(By.CSS_SELECTOR, f"#view-{side} canvas")
        engine = wait_for(lambda v=viewer: v.get_attribute("data-engine"), 60, "the viewer's engine")  # set once it runs
        assert engine.startswith("Babylon.js")
        shares[side] = wait_for(lambda v=viewer: (share := drawn_share(v)) > 0.02 and share, 60, f"the {side} model drawn")
    status = browser.find_element(By.ID, "status").text
    assert "base model: 2/2 instances meshed" in status and "LoRA lora-final × 1: 2/2 instances meshed" in status

    # Releasing the scale slider re-runs the LoRA side only (the base comes from the cache).
    before = dict(studio.runs_made)
    slider = browser.find_element(By.CSS_SELECTOR, "#scale input[type=range]")
    ActionChains(browser).click_and_hold(slider).move_by_offset(-60, 0).release().perform()
    wait_for(lambda: "(cached)" in browser.find_element(By.ID, "status").text, 180, "the slider's re-run")
    assert studio.runs_made["base"] == before["base"] and studio.runs_made["lora"] == before["lora"] + 1

    artifacts = Path(os.environ.get("MIDI_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(1)  # let the viewers redraw after the scroll
    browser.save_screenshot(str(artifacts / "app.png"))
    print(f"screenshot: {artifacts / 'app.png'} (models cover {shares} of the viewers)")
