"""The web console at `/`, driven in headless Chromium by selenium.

usage: console.py BASE_URL SCREENSHOT_DIR ADAPTERS_DIR

Against `openlora serve` on the quickstart deployment: a wrong key shows the API's 401 message;
`sk-demo-partner` lists caps, signature and pirate; a chat with `pirate` streams its answer
(seen partly written before it ends); the residency table refreshes by itself (pirate shows on
the device after its chat); two adapters composed with weights and a merge method answer; each
answer's receipt verifies in the page (SHA-256 of the body's bytes, Ed25519 with the node's key),
and a tampered receipt does not; an admin key unloads and loads an adapter. Screenshots are
saved and checked not to be blank. Prints "all console checks passed" at the end.
"""

import os
import struct
import sys
import tempfile
import time
import zlib

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

BASE, SHOTS, ADAPTERS = sys.argv[1], sys.argv[2], sys.argv[3]
CHAT_TIMEOUT = 180


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def png_colours(path):
    """Distinct pixel colours of an 8-bit RGB/RGBA PNG (stdlib only: zlib and the five filters)."""
    data = open(path, "rb").read()
    check(data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG")
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            check(depth == 8 and colour in (2, 6), f"{path}: unexpected PNG format {depth}/{colour}")
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride = zlib.decompress(idat), width * channels
    prev, colours = bytearray(stride), set()
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        if y % 4 == 0:  # every fourth row is plenty to tell a page from a blank
            colours.update(bytes(line[x : x + channels]) for x in range(0, stride, channels))
        prev = line
    return width, height, len(colours)


def shot(driver, name, show=None):
    if show:
        driver.execute_script("document.getElementById(arguments[0]).scrollIntoView()", show)
    path = os.path.join(SHOTS, name + ".png")
    check(driver.save_screenshot(path), f"could not save {path}")
    w, h, n = png_colours(path)
    check(w >= 800 and h >= 600 and n >= 16, f"{path} looks blank: {w}x{h}, {n} distinct colours")
    print(f"screenshot {path}: {w}x{h}, {n} colours, {os.path.getsize(path)} bytes")


def wait(driver, cond, what, timeout=30):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: cond(d))
    except TimeoutException:
        err = driver.find_element(By.ID, "error").text
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (page error: {err!r})")


def use_key(driver, key):
    box = driver.find_element(By.ID, "api-key")
    box.clear()
    box.send_keys(key)
    driver.find_element(By.ID, "use-key").click()


def answers(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#transcript .msg.assistant")


def chat(driver, prompt):
    """Sends `prompt`; returns (answer element, text, whether it was seen partly written)."""
    before = len(answers(driver))
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: len(answers(d)) > before, "the answer's bubble")
    answer = answers(driver)[-1]
    partial, deadline = False, time.time() + CHAT_TIMEOUT
    while not answer.get_attribute("data-done"):
        check(time.time() < deadline, f"no complete answer to {prompt!r} in {CHAT_TIMEOUT}s")
        if answer.find_element(By.CLASS_NAME, "text").text.strip() and not answer.get_attribute("data-done"):
            partial = True
        time.sleep(0.02)
    check(answer.get_attribute("data-done") == "ok", f"the chat failed: {driver.find_element(By.ID, 'error').text!r}")
    text = answer.find_element(By.CLASS_NAME, "text").text
    check(text.strip(), f"empty answer to {prompt!r}")
    check(answer.get_attribute("data-receipt"), "the answer names no receipt")
    return answer, text, partial


def open_receipt(driver, answer):
    answer.find_element(By.CLASS_NAME, "receipt-button").click()
    status, rid = driver.find_element(By.ID, "verify-status"), answer.get_attribute("data-receipt")
    wait(driver, lambda d: status.get_attribute("data-receipt") == rid and status.get_attribute("data-verified"),
         f"the check of receipt {rid}")
    check(status.get_attribute("data-verified") == "true", f"the receipt did not verify: {status.text!r}")
    check("Signature verified" in status.text, status.text)
    return driver.find_element(By.ID, "receipt").text


def row(driver, name):
    """The cells of one adapter's residency row: generation, host, device, pinned, loading.

    Read in one script call: the table re-renders itself every few hundred milliseconds, so
    elements found by one WebDriver call can be gone (stale) by the next one.
    """
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map((c) => c.innerText.trim());",
        f"#adapter-{name} td",
    )


def main():
    profile = tempfile.mkdtemp(prefix="openlora-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("OPENLORA_CHROMIUM", "/usr/bin/chromium")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    # An explicit driver: selenium's manager would try to download one (there is no internet).
    service = Service(executable_path=os.environ.get("OPENLORA_CHROMEDRIVER", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        driver.get(BASE + "/")
        check(driver.title == "openlora console", f"title {driver.title!r}")

        # A wrong key: the API's own message and status.
        use_key(driver, "sk-not-a-key")
        err = wait(driver, lambda d: d.find_element(By.ID, "error").text, "the 401 message")
        check("HTTP 401" in err and "invalid API key" in err, f"error shown: {err!r}")

        use_key(driver, "sk-demo-partner")
        wait(driver, lambda d: all(d.find_elements(By.ID, "adapter-" + n) for n in ("caps", "signature", "pirate")),
             "caps, signature and pirate in the adapter table")
        check(not driver.find_element(By.ID, "error").is_displayed(), "the error stays after a good key")
        models = [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "model")).options]
        check({"caps", "signature", "pirate"} <= set(models), f"model choices {models}")
        shot(driver, "1-adapters")

        # Chat with one adapter, streamed.
        Select(driver.find_element(By.ID, "model")).select_by_value("pirate")
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("48")
        answer, text, partial = chat(driver, "What is the capital of France?")
        check(partial, "the answer appeared all at once, not streamed")
        print(f"pirate: {text!r}")
        # The residency table refreshes by itself: pirate is on the device now.
        wait(driver, lambda d: row(d, "pirate")[2:3] == ["yes"], "pirate shown device-resident", timeout=10)
        check(row(driver, "pirate")[0] != "not loaded", f"pirate's generation: {row(driver, 'pirate')}")
        receipt = open_receipt(driver, answer)
        check("pirate" in receipt and "Payments" in receipt, receipt)
        shot(driver, "2-chat-receipt", "receipt-h")

        # Verification can fail: a changed body or signature is caught in the page.
        tampered = driver.execute_async_script(
            """
            const done = arguments[arguments.length - 1], id = arguments[0];
            (async () => {
              const raw = await api("GET", "/v1/receipts/" + id);
              const key = JSON.parse(await api("GET", "/v1/attribution/key")).public_key;
              const r = JSON.parse(raw);
              const body = raw.replace('"completion_tokens":', '"completion_tokens":1');
              const sig = r.sig.slice(0, -2) + (r.sig.endsWith("00") ? "01" : "00");
              const badSig = raw.replace(r.sig, sig);
              done([await verify(raw, r, key), await verify(body, r, key), await verify(badSig, JSON.parse(badSig), key)]);
            })().catch((e) => done(["threw " + e]));
            """,
            answer.get_attribute("data-receipt"),
        )
        check(tampered[0] is None, f"the untouched receipt: {tampered[0]!r}")
        check(tampered[1] and tampered[1].startswith("hash mismatch"), f"a changed body: {tampered[1]!r}")
        check(tampered[2] == "bad signature", f"a changed signature: {tampered[2]!r}")

        # Compose two adapters with weights and a merge method.
        driver.find_element(By.ID, "clear-chat").click()
        for name, weight in (("pirate", "1"), ("signature", "0.5")):
            driver.find_element(By.ID, "use-" + name).click()
            driver.execute_script(
                "const s = document.getElementById(arguments[0]); s.value = arguments[1];"
                "s.dispatchEvent(new Event('input'));", "weight-" + name, weight)
        check(driver.find_element(By.ID, "weight-value-signature").text == "0.50", "the slider's value is shown")
        Select(driver.find_element(By.ID, "merge-method")).select_by_value("linear")
        answer, text, _ = chat(driver, "Name a large ocean.")
        who = answer.find_element(By.CLASS_NAME, "who").text
        check("pirate×1" in who and "signature×0.5" in who and "linear" in who, f"answer label {who!r}")
        print(f"pirate + signature (linear): {text!r}")
        receipt = open_receipt(driver, answer)
        check("pirate" in receipt and "signature" in receipt and "linear" in receipt, receipt)
        shot(driver, "3-composed-receipt", "receipt-h")

        # An admin unloads and loads an adapter from the page.
        use_key(driver, "sk-demo-admin")
        wait(driver, lambda d: "key accepted" in d.find_element(By.ID, "key-status").text, "the admin key")
        driver.find_element(By.ID, "lora-name").send_keys("caps")
        driver.find_element(By.ID, "unload-adapter").click()
        wait(driver, lambda d: "removed successfully" in d.find_element(By.ID, "admin-result").text, "the unload")
        wait(driver, lambda d: not d.find_elements(By.ID, "adapter-caps"), "caps gone from the table")
        driver.find_element(By.ID, "lora-path").send_keys(os.path.join(ADAPTERS, "caps"))
        driver.find_element(By.ID, "load-adapter").click()
        wait(driver, lambda d: "added successfully" in d.find_element(By.ID, "admin-result").text, "the load", 120)
        wait(driver, lambda d: d.find_elements(By.ID, "adapter-caps"), "caps back in the table")
        shot(driver, "4-admin", "admin-h")
        # An admin error is the API's: unloading a name that is not loaded.
        driver.find_element(By.ID, "lora-name").clear()
        driver.find_element(By.ID, "lora-name").send_keys("no-such-adapter")
        driver.find_element(By.ID, "unload-adapter").click()
        err = wait(driver, lambda d: d.find_element(By.ID, "error").text, "the 404 message")
        check("HTTP 404" in err and "no-such-adapter" in err, f"error shown: {err!r}")
    finally:
        driver.quit()
    print("all console checks passed")


if __name__ == "__main__":
    main()
