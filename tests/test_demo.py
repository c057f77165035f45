"""demo.py: the server's answers to good and bad requests, and the page in a real headless
Chromium (Debian's chromium and chromium-driver, which .ci/run installs): a box drawn by
mouse and a text name give predict.predict's detections, a non-picture gets a message, and
nothing is fetched from outside 127.0.0.1."""

import base64
import io
import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import demo
import train_sft
from conftest import run_args
from evaluate import coco_results
from predict import Exemplar, Prompts, predict, prompts_from_text

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def app(shapes, tmp_path_factory):
    """A tiny checkpoint trained for two steps, served on a free port."""
    folder = tmp_path_factory.mktemp("demo")
    train_sft.main(run_args(shapes, folder / "run", "--max-steps", "2"))
    served = demo.Demo(str(folder / "run" / "last.pt"), sorted((shapes / "val").glob("*.png")))
    server = demo.serve(served, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def data_url(picture: Image.Image, format: str = "PNG", **options) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format=format, **options)
    return f"data:image/{format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def boxed(box, name="thing"):
    return [{"box": list(box), "name": name}]


@pytest.mark.parametrize("request_, says", [
    ({"boxes": boxed((20, 20, 20, 40))}, "box 1 on the picture has no size"),
    ({"boxes": boxed((60, 60, 20, 20))}, "box 1 on the picture runs backwards"),
    ({"boxes": boxed((100, 100, 140, 140))}, "box 1 on the picture leaves the picture (128x128)"),
    ({"boxes": boxed((10, 10, 40, 40), " ")}, "box 1 on the picture has no name"),
    ({"text": ["cat", "cat"]}, "the name 'cat' is given twice"),
    ({"boxes": boxed((10, 10, 40, 40), "cat"), "text": ["cat"]}, "the name 'cat' is given twice"),
    ({"exemplars": [{"image": {"offered": 1}, "boxes": []}]}, "exemplar picture 1 has no box"),
    ({}, "no prompt: draw a box"),
    ({"image": {"data": "data:text/plain;base64," + base64.b64encode(b"hello").decode()},
      "text": ["cat"]}, "cannot read the picture"),
    ({"image": {"offered": 99}, "text": ["cat"]}, "no offered picture 99"),
])
def test_bad_requests_get_one_line_and_the_server_goes_on(app, request_, says):
    served, _ = app
    with pytest.raises(demo.BadRequest, match=says.replace("(", r"\(").replace(")", r"\)")):
        served.detect({"image": {"offered": 0}, **request_})
    assert served.detect({"image": {"offered": 0}, "text": ["red circle"]})["detections"]


def test_greyscale_cmyk_and_rotated_pictures_are_read_upright(app, shapes, monkeypatch):
    """A picture taken sideways (EXIF orientation 6) is turned upright before detection, as
    the browser shows it; greyscale and CMYK become RGB; too many pixels is one line."""
    served, _ = app
    picture = data.read_rgb_image(shapes / "val" / "000001.png").crop((0, 0, 128, 96))
    stored = picture.transpose(Image.Transpose.ROTATE_90)          # as a sideways camera
    exif = Image.Exif()
    exif[0x0112] = 6                                               # rotate 270 to show
    request = {"text": ["red circle"], "top_k": 20}
    upright = served.detect({"image": {"data": data_url(picture)}, **request})
    turned = served.detect({"image": {"data": data_url(stored, "JPEG", exif=exif, quality=100)},
                            **request})
    assert (turned["width"], turned["height"]) == (upright["width"], upright["height"]) \
        == (128, 96)
    for mode in ("L", "CMYK"):
        found = served.detect({"image": {"data": data_url(picture.convert(mode), "JPEG")},
                               **request})
        assert len(found["detections"]) == 20
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(demo.BadRequest, match="the picture is 128x96 pixels, more than"):
        served.detect({"image": {"data": data_url(picture)}, **request})


def test_an_unknown_checkpoint_is_one_line_and_no_server(tmp_path):
    with pytest.raises(SystemExit, match="nope.pt not found"):
        demo.main(["--ckpt", str(tmp_path / "nope.pt")])


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs "
                    "them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--disable-dev-shm-usage",
                 "--window-size=1100,800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def answer_of(driver) -> dict:
    """Waits for the page's answer to Detect, and returns it."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return window.lastAnswer !== undefined && !document.getElementById('detect').disabled"))
    return driver.execute_script("return window.lastAnswer")


def draw_a_box(driver, box, name):
    """Drag a box on the picture's canvas by mouse (box in picture pixels) and name it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "picture")
    scale = driver.execute_script("return main.scale")
    width, height = canvas.size["width"], canvas.size["height"]
    x0, y0, x1, y1 = (round(value * scale) for value in box)
    ActionChains(driver).move_to_element_with_offset(canvas, x0 - width // 2, y0 - height // 2) \
        .click_and_hold().move_by_offset(x1 - x0, y1 - y0).release().perform()
    driver.find_elements(By.CSS_SELECTOR, ".box-name")[-1].send_keys(name)


def pick(driver, index):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#offered img")) > index)
    driver.find_elements(By.CSS_SELECTOR, "#offered img")[index].click()
    wait.until(lambda d: d.execute_script("return main.image !== null"))


def test_a_box_drawn_by_mouse_finds_what_predict_finds(app, browser, shapes, tmp_path):
    from selenium.webdriver.common.by import By

    served, url = app
    browser.get(url)
    pick(browser, 1)
    draw_a_box(browser, (20, 30, 60, 70), "thing")
    browser.find_element(By.ID, "text-name").send_keys("red circle")
    browser.find_element(By.ID, "add-text").click()
    browser.find_element(By.ID, "detect").click()
    found = answer_of(browser)
    assert "error" not in found, found
    sent = browser.execute_script("return window.lastRequest")
    box = sent["boxes"][0]["box"]
    assert sent["boxes"][0]["name"] == "thing" and sent["text"] == ["red circle"]
    assert all(abs(a - b) <= 1 for a, b in zip(box, (20, 30, 60, 70))), box
    browser.execute_script("const slider = document.getElementById('threshold'); "
                           "slider.value = 0; slider.dispatchEvent(new Event('input'));")
    rows = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "tr.detection")]
    picture = data.read_rgb_image(served.pictures[1])
    expected = predict(served.model, picture, Prompts([Exemplar(tuple(box), "thing")])
                       + prompts_from_text(["red circle"]), threshold=0.0)
    results = coco_results(expected.detections, {"file_name": "picture"}, "name", expected.names)
    assert len(rows) == len(results) == 100
    for row, result in zip(rows, results):                  # "name score x, y, w, h"
        words = row.split(" ")
        name, score, box = " ".join(words[:-5]), words[-5], words[-4:]
        assert name == result["name"] and float(score) == pytest.approx(result["score"], abs=1e-4)
        assert [float(v.strip(",")) for v in box] == pytest.approx(result["bbox"], abs=1e-6)
    assert found["detections"] == json.loads(json.dumps(results))
    requests = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    fetched = {m["params"]["request"]["url"] for m in requests
               if m["method"] == "Network.requestWillBeSent"}
    outside = [u for u in fetched if not u.startswith((url, "blob:" + url[:-1], "data:"))]
    assert fetched and not outside, outside


def test_a_file_that_is_not_a_picture_gets_a_message_then_a_good_request_works(
        app, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _, url = app
    browser.get(url)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a picture")
    browser.find_element(By.ID, "upload").send_keys(str(text_file))
    browser.find_element(By.ID, "text-name").send_keys("red circle")
    browser.find_element(By.ID, "add-text").click()
    browser.find_element(By.ID, "detect").click()
    found = answer_of(browser)
    assert found["error"].startswith("cannot read the picture")
    assert browser.find_element(By.ID, "message").text == found["error"]
    browser.execute_script("window.lastAnswer = undefined")
    pick(browser, 2)
    draw_a_box(browser, (10, 10, 50, 50), "thing")
    browser.find_element(By.ID, "detect").click()
    found = answer_of(browser)
    assert "error" not in found and len(found["detections"]) == 100
    assert browser.find_element(By.ID, "message").text == ""
    assert torch.tensor([d["score"] for d in found["detections"]]).ge(0).all()


def test_a_second_request_waits_for_the_first(app):
    """One detection at a time: while one holds the model, another request waits (and is
    answered once the model is free)."""
    import urllib.request

    served, url = app
    answers = []

    def ask():
        body = json.dumps({"image": {"offered": 0}, "text": ["red circle"]}).encode()
        with urllib.request.urlopen(urllib.request.Request(url + "detect", body)) as reply:
            answers.append(json.loads(reply.read()))

    with served.lock:                                  # the first detection, still running
        waiting = threading.Thread(target=ask)
        waiting.start()
        waiting.join(timeout=3)
        assert waiting.is_alive() and not answers
    waiting.join(timeout=60)
    assert len(answers) == 1 and len(answers[0]["detections"]) == 100


def test_boxes_for_a_grounding_dino_folder_get_predicts_message(tmp_path):
    """A Grounding DINO folder has no trained visual prompt encoder: boxes are refused with
    predict.py's message, text is answered."""
    from checkpoints import UNTRAINED_VISUAL_PROMPTS
    from test_grounding_dino import save_tiny_grounding_dino

    folder = tmp_path / "gd"
    folder.mkdir()
    save_tiny_grounding_dino(folder)
    picture = tmp_path / "picture.png"
    Image.new("RGB", (160, 128), (90, 120, 150)).save(picture)
    served = demo.Demo(str(folder), [picture])
    with pytest.raises(demo.BadRequest) as refused:
        served.detect({"image": {"offered": 0}, "boxes": boxed((10, 10, 50, 50))})
    assert str(refused.value) == UNTRAINED_VISUAL_PROMPTS.format(path=folder)
    assert served.detect({"image": {"offered": 0}, "text": ["cat"]})["names"] == ["cat"]
