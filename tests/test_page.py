"""The sampler's page in a real browser: the system's headless Chromium, driven by Selenium
through the packaged chromedriver, against a real ``ldmflow serve`` of two versions (the
trained digits model in production, an untrained UNet as the candidate). It loads with no
console error, refuses a wrong key on the page, draws both versions on the same seeds with
the API's pixels, inpaints under a painted mask, and promotes with a promotion key, leaving
the record ``ldmflow promote`` leaves."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from ldmflow.data import builtin
from ldmflow.registry import gate, models, tracking
from ldmflow.serving import app
from tests import helpers

pytestmark = pytest.mark.skipif(not helpers.chromium_available(), reason=helpers.CHROMIUM_MISSING)

NAME = "page-test"
KEY = "page-key-0123456789abcdefghijklmno"
PROMOTE_KEY = "page-promote-key-0123456789abcdefg"


@pytest.fixture(scope="module")
def served(digits_model, tmp_path_factory):
    """``ldmflow serve models:/page-test@production``: version 1 (trained) in production,
    version 2 (an untrained UNet) the candidate, both with a recorded FD."""
    from ray import serve

    folder = tmp_path_factory.mktemp("page")
    client = tracking.client()
    run = client.create_run(tracking.experiment_id("test-page")).info.run_id
    production = models.register(digits_model.folder, NAME, run).version
    client.set_registered_model_alias(NAME, "production", production)
    candidate = models.register(helpers.random_unet_copy(digits_model.folder, folder / "untrained"), NAME, run).version
    for version, fd in ((production, 20.0), (candidate, 10.0)):  # the evaluations the gate reads
        client.set_model_version_tag(NAME, version, "ldmflow.eval.fd", repr(fd))
        client.set_model_version_tag(NAME, version, "ldmflow.eval.config", "page-test")
    (folder / "keys").write_text(KEY + "\n")
    (folder / "promote-keys").write_text(f"ana:{PROMOTE_KEY}\n")
    config = app.ServeConfig(port=helpers.free_port(), num_cpus=0.5, follow_seconds=0.5, max_steps=50,
                             api_keys_file=str(folder / "keys"), promote_keys_file=str(folder / "promote-keys"))
    url = app.run(f"models:/{NAME}@production", config, promotion=gate.PromotionConfig(metric="fd"))
    yield url, production, candidate
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    driver = helpers.chromium()
    yield driver
    driver.quit()


def pixels(src: str) -> np.ndarray:
    """An <img>'s or a canvas's data URL as RGB pixels."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")).astype(int)


def status(driver) -> str:
    return driver.find_element("id", "status").text


def use_key(driver, key: str) -> None:
    field = driver.find_element("id", "key")
    field.clear()
    field.send_keys(key)
    driver.find_element("id", "save-key").click()


def test_the_page_compares_inpaints_and_promotes_in_a_real_browser(served, browser, digits_model, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    url, production, candidate = served
    driver = browser

    # It loads with no console error, and asks for a key (the server has keys).
    driver.get(url + "/")
    helpers.wait_until(lambda: "give a key" in status(driver), 30, "the page asking for a key")
    assert [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"] == []

    # A wrong key is refused on the page, naming what is wrong.
    use_key(driver, "not-a-key-of-this-server-at-all")
    helpers.wait_until(lambda: status(driver).startswith("authorization:"), 30, "the refusal of a wrong key")
    assert driver.find_elements("css selector", "#versions tbody tr") == []

    # With the API key: both versions listed; a compare draws N images a side, each the
    # API's for the same seed.
    use_key(driver, KEY)
    helpers.wait_until(lambda: len(driver.find_elements("css selector", "#versions tbody tr")) == 2, 30,
                       "the two versions listed")
    Select(driver.find_element("id", "left")).select_by_value("candidate")
    Select(driver.find_element("id", "right")).select_by_value("production")
    Select(driver.find_element("css selector", "#compare-form .condition-value")).select_by_value("7")
    for field, value in (("seed", "3"), ("n", "3"), ("steps", "8")):
        driver.find_element("id", field).clear()
        driver.find_element("id", field).send_keys(value)
    driver.find_element("id", "compare").click()
    helpers.wait_until(lambda: len(helpers.page_images(driver, "left-images")) == 3
                       == len(helpers.page_images(driver, "right-images")), 60, "both sides drawn")
    for side, version in (("left-images", candidate), ("right-images", production)):
        assert driver.find_element("id", side).get_attribute("data-version") == version
        _, answer = helpers.call(url, "/v1/generate", {"label": 7, "seed": 3, "n": 3, "steps": 8, "version": version},
                         authorization=f"Bearer {KEY}")
        for shown, sent in zip(helpers.page_images(driver, side), answer["images"]):
            assert np.array_equal(pixels(shown), pixels("data:," + sent))
    assert "fd 10.00" in driver.find_element("id", "left-about").text
    assert "fd 20.00" in driver.find_element("id", "right-about").text

    # Inpainting: a real digit uploaded, its bottom half painted over; the result is the
    # API's for the same image and mask, and the unpainted top keeps the digit.
    digit = tmp_path / "digit.png"
    digit.write_bytes(builtin.load("builtin:digits").png(11))
    driver.find_element("id", "upload").send_keys(str(digit))
    helpers.wait_until(lambda: pixels(driver.execute_script(
        "return document.getElementById('source-canvas').toDataURL()")).max() > 0, 30, "the digit in the canvas")
    Select(driver.find_element("id", "draw-version")).select_by_value("production")
    canvas = driver.find_element("id", "mask-canvas")
    side = canvas.size["width"]
    drag = ActionChains(driver).move_to_element_with_offset(canvas, -side // 2 + 3, 3).click_and_hold()
    for row, y in enumerate(range(3, side // 2 - 2, 3)):  # back and forth over the bottom half
        for x in (range(3, side - 3, 6) if row % 2 == 0 else range(side - 4, 2, -6)):
            drag.move_to_element_with_offset(canvas, -side // 2 + x, y)
    drag.release().perform()
    mask = pixels(driver.execute_script("return document.getElementById('mask-canvas').toDataURL()"))[..., 0]
    rows = mask.shape[0]
    assert mask[: rows // 2 - rows // 8].max() == 0 and mask[rows // 2 + rows // 8 :].min() == 255, mask
    driver.find_element("id", "inpaint").click()
    helpers.wait_until(lambda: len(helpers.page_images(driver, "edit-images")) == 1, 60, "the inpainted digit")
    source = driver.execute_script("return document.getElementById('source-canvas').toDataURL()")
    sent_mask = driver.execute_script("return document.getElementById('mask-canvas').toDataURL()")
    _, answer = helpers.call(url, "/v1/inpaint", {"label": 0, "seed": 0, "n": 1, "image": source, "mask": sent_mask,
                                          "version": "production"}, authorization=f"Bearer {KEY}")
    result = pixels(helpers.page_images(driver, "edit-images")[0])
    assert np.array_equal(result, pixels("data:," + answer["images"][0]))
    kept = np.abs(result - pixels(source))[: rows // 4].mean()  # far from the painted rows
    changed = np.abs(result - pixels(source))[rows * 3 // 4 :].mean()
    assert kept < changed, (kept, changed)

    # Promotion: the API key may draw but not promote, and is told so on the page; the
    # promotion key promotes the better candidate, recorded as `ldmflow promote` records it.
    Select(driver.find_element("id", "promote-version")).select_by_value("candidate")
    driver.find_element("id", "reason").send_keys("sharper sevens")
    driver.find_element("id", "promote").click()
    helpers.wait_until(lambda: "may draw but not promote" in status(driver), 30, "the refusal of an API key")
    assert str(tracking.client().get_model_version_by_alias(NAME, "production").version) == production
    use_key(driver, PROMOTE_KEY)
    helpers.wait_until(lambda: len(driver.find_elements("css selector", "#versions tbody tr")) == 2, 30, "reloaded")
    Select(driver.find_element("id", "promote-version")).select_by_value("candidate")
    driver.find_element("id", "promote").click()
    helpers.wait_until(lambda: driver.find_element("id", "decision").text.startswith("promoted version"), 30,
                       "the decision on the page")
    assert f"promoted version {candidate} (by ana)" in driver.find_element("id", "decision").text
    assert str(tracking.client().get_model_version_by_alias(NAME, "production").version) == candidate
    tags = tracking.client().get_model_version(NAME, candidate).tags
    decision = {key[len(gate.DECISION_TAG):]: value for key, value in tags.items() if key.startswith(gate.DECISION_TAG)}
    assert set(decision) == {"decision", "reason", "metric", "candidate_score", "production_version",
                             "production_score", "forced", "by", "why", "time"}  # what the CLI's promote writes
    assert (decision["decision"], decision["by"], decision["why"]) == ("promoted", "ana", "sharper sevens")
    helpers.wait_until(lambda: "promoted by ana" in driver.find_element("id", "versions").text, 30,
                       "the versions listed again, with the decision")
    driver.save_screenshot(os.environ.get("LDMFLOW_PAGE_SCREENSHOT") or str(tmp_path / "page.png"))
