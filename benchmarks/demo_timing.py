"""The demo page's time from request to drawing, in a real headless Chromium, and a screenshot.

    python benchmarks/demo_timing.py --ckpt runs/grqo/last.pt --screenshot docs/demo.png
    python benchmarks/demo_timing.py --preset swin_t --repeats 3      # random weights, 800x1333

Starts demo.py's server on a free port, opens the page, picks a `val` picture (resized to the
preset's size for a preset of 800 pixels), draws a box by mouse, adds a text name, presses
Detect `--repeats` times and reports the median of the page's own measure (from the click to
the detections drawn). Needs Debian's chromium and chromium-driver, and selenium.
"""

import argparse
import statistics
import sys
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402
from checkpoints import CHECKPOINT_FORMAT  # noqa: E402
from data import read_rgb_image, resolve_data_root  # noqa: E402
from model import build_model  # noqa: E402


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--disable-dev-shm-usage",
                 "--window-size=1000,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a checkpoint (default: --preset with random weights)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--picture", default="000019.png", help="of the default val split")
    parser.add_argument("--box", default="30,96,62,128", help="x0,y0,x1,y1 on the val picture")
    parser.add_argument("--name", default="red star")
    parser.add_argument("--text", default="green cross")
    parser.add_argument("--exemplar", default="support/000009.png:44,25,78,63=blue triangle",
                        help="SPLIT/FILE:X0,Y0,X1,Y1=NAME, a box on another default picture "
                             "('' for none; not with a preset of 800 pixels)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wait", type=float, default=600, help="seconds for one detection")
    parser.add_argument("--screenshot", help="write the page after the last request here")
    args = parser.parse_args(argv)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, size = args.ckpt, None
        if checkpoint is None:
            torch.manual_seed(0)
            model = build_model(args.preset, kernel="torch")
            checkpoint = str(Path(scratch) / "random.pt")
            torch.save({"model": model.state_dict(), "config": asdict(model.config),
                        "format": CHECKPOINT_FORMAT}, checkpoint)
            size = (model.config.max_size, model.config.image_size) \
                if model.config.image_size > 400 else None
        picture = resolve_data_root("shapes") / "val" / args.picture
        box = [float(value) for value in args.box.split(",")]
        if size:                                   # the val picture at the preset's size
            resized = Path(scratch) / args.picture
            read_rgb_image(picture).resize(size).save(resized)
            box = [value * size[0] / 128 if i % 2 == 0 else value * size[1] / 128
                   for i, value in enumerate(box)]
            picture = resized
        served = demo.Demo(checkpoint, [picture])
        server = demo.serve(served, 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        driver = browser()
        try:
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
            wait = WebDriverWait(driver, args.wait)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#offered img"))
            driver.find_element(By.CSS_SELECTOR, "#offered img").click()
            wait.until(lambda d: d.execute_script("return main.image !== null"))

            def drag(canvas, surface: str, box: list[float], name: str) -> None:
                """A box dragged by mouse on a canvas of the page, then named."""
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
                scale = driver.execute_script(f"return {surface}.scale")
                width, height = canvas.size["width"], canvas.size["height"]
                x0, y0, x1, y1 = (round(value * scale) for value in box)
                ActionChains(driver).move_to_element_with_offset(
                    canvas, x0 - width // 2, y0 - height // 2).click_and_hold() \
                    .move_by_offset(x1 - x0, y1 - y0).release().perform()
                driver.find_elements(By.CSS_SELECTOR, ".box-name")[-1].send_keys(name)

            drag(driver.find_element(By.ID, "picture"), "main", box, args.name)
            if args.exemplar and not size:
                where, rest = args.exemplar.split(":", 1)
                corners, exemplar_name = rest.split("=", 1)
                driver.find_element(By.ID, "exemplar-upload").send_keys(
                    str((resolve_data_root("shapes") / where).resolve()))
                wait.until(lambda d: d.execute_script(
                    "return exemplars.length > 0 && exemplars[0].image !== null"))
                drag(driver.find_element(By.CSS_SELECTOR, "#exemplars canvas"), "exemplars[0]",
                     [float(value) for value in corners.split(",")], exemplar_name)
            driver.find_element(By.ID, "text-name").send_keys(args.text)
            driver.find_element(By.ID, "add-text").click()
            seconds = []
            for _ in range(args.repeats):
                driver.find_element(By.ID, "detect").click()
                wait.until(lambda d: d.execute_script(
                    "return window.drawnAt !== undefined || (window.lastAnswer || {}).error"))
                error = driver.execute_script("return (window.lastAnswer || {}).error")
                if error:
                    raise SystemExit(f"the page answered: {error}")
                seconds.append(driver.execute_script(
                    "return (window.drawnAt - window.requestedAt) / 1000"))
            if args.screenshot:
                driver.execute_script("const slider = document.getElementById('threshold'); "
                                      "slider.value = 0.15; "
                                      "slider.dispatchEvent(new Event('input'));")
                WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                    "return document.getElementById('result').complete"))
                driver.execute_script("window.scrollTo(0, 0)")
                driver.save_screenshot(args.screenshot)
        finally:
            driver.quit()
            server.shutdown()
    print(f"{args.ckpt or 'random ' + args.preset}: request to drawing "
          f"{statistics.median(seconds):.2f} s (median of {len(seconds)}: "
          f"{', '.join(f'{s:.2f}' for s in seconds)})")
    return seconds


if __name__ == "__main__":
    main()
