"""The page of `localpers serve`, driven in a real browser (Debian's chromium and chromium-driver, with selenium):
the person chats a preference, watches it become a fact that is learned and then in use, sees the job finish,
asks again and reads in the "why" panel the adapter that shaped the reply, corrects the fact, deletes it and sees
the adapter retired, downloads their data and forgets themselves. The server runs with an API key, which the
person types into the page. Each step leaves a screenshot (docs/page/ holds the committed ones: set
LOCALPERS_PAGE_SHOTS=docs/page to refresh them).

The embedded model answers; the edit job is a stand-in that registers an adapter of random weights (as in
tests/test_loop.py), so the test runs in seconds; the real edit on the served path is tests/test_north_star.py.
The browser is required, not optional: `bash install.sh test` installs it (as root), and without it these tests
fail with the command that installs it."""
import json
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from localpers import names
from localpers.engine.engine import model_sha256
from localpers.errors import UserError
from localpers.serve import jobs
from localpers.serve.server import create_app
from tests.serve_helpers import live_server
from tests.test_loop import adapter, engine  # noqa: F401 (the loop's fixtures: the embedded model, a random adapter)

KEY = "page-test-key"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1000"]


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        pytest.fail("the page tests need Debian's chromium and chromium-driver: `bash install.sh test` as root, "
                    "or `apt-get install -y chromium chromium-driver`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("LOCALPERS_PAGE_SHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)

    def shot(driver, name):
        driver.save_screenshot(str(folder / f"{name}.png"))
    return shot


@pytest.fixture
def server(engine, adapter, tmp_path, monkeypatch):
    """A served app with the API key, its job worker, and an edit job that waits for `gate` the first time (so
    that the page is seen saying "learning…") and registers the random adapter from the current preferences."""
    gate, runs = threading.Event(), []

    def edit(store, user, engine, job):
        runs.append(job)
        if len(runs) == 1:
            gate.wait(60)
        prefs = store.items(user, kind=names.PREFERENCE)
        if any("Alps" in p["text"] for p in prefs):  # a job that fails, with its reason
            raise UserError("no edit of 'I love hiking in the Alps.' verified (a stand-in failure)")
        sha = model_sha256(engine.model_path)
        if not prefs:
            return {"retired": store.retire_artifacts(user, names.LORA, sha, names.EDIT)}
        artifact = store.register_artifact(user, names.LORA, adapter, sha,
                                           {"method": names.EDIT, "sources": [p["id"] for p in prefs]}, job=job)
        return {"artifact": artifact, "edited": len(prefs), "failed": 0, "retired": 0}

    monkeypatch.setitem(jobs.JOB_KINDS, names.EDIT, edit)
    app = create_app(engine=engine, data_dir=str(tmp_path / "home"), jobs=True, api_key=KEY)
    with live_server(app) as url:
        yield url, gate


def wait(driver, condition, what, limit_s=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, limit_s, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def find(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def texts(driver, css):
    """The rendered texts of the elements `css` selects, read in one step (the page re-renders as it polls)."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.innerText)", css)


def chat(driver, text):
    """Send a message with the keyboard and wait until its reply (and its why panel) is complete."""
    from selenium.webdriver.common.keys import Keys

    before = len(texts(driver, ".msg.assistant"))
    find(driver, "#chat-input").send_keys(text + Keys.ENTER)
    wait(driver, lambda d: len(texts(d, ".msg.assistant .why summary")) == before + 1, f"the reply to {text!r}")


def open_tab(driver, name):
    find(driver, f"#tab-{name}").click()
    wait(driver, lambda d: find(d, f"#panel-{name}").is_displayed(), f"the {name} tab")


def api(url, method, path):
    return httpx.request(method, url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def test_page_chat_learn_why_correct_delete_forget(server, browser, shots, tmp_path):
    from selenium.webdriver.common.keys import Keys

    url, gate = server
    b = browser
    b.get(url + "/")
    # the key is asked for once, by the page, then the person
    wait(b, lambda d: find(d, "#key-dialog").get_attribute("open") is not None, "the API key dialog")
    find(b, "#api-key").send_keys(KEY + Keys.ENTER)
    wait(b, lambda d: find(d, "#person-dialog").get_attribute("open") is not None, "the person dialog")
    find(b, "#person").send_keys("ann" + Keys.ENTER)
    wait(b, lambda d: find(d, "body").get_attribute("data-ready") == "true", "the page ready")
    assert find(b, "#who").text == "Chatting as ann"
    assert b.execute_script("return sessionStorage.getItem('localpers.key')") == KEY
    assert b.execute_script("return localStorage.getItem('localpers.user')") == "ann"
    max_tokens = find(b, "#max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("8")

    # 1. a stated preference: noted, learning, then in use
    chat(b, "I'm vegetarian.")
    wait(b, lambda d: texts(d, ".msg.user .noted") == ["noted: vegetarian — learning…"], "learning…")
    shots(b, "1-chat-noted-learning")
    gate.set()
    wait(b, lambda d: texts(d, ".msg.user .noted") == ["noted: vegetarian — in use"], "in use")
    shots(b, "2-chat-in-use")

    # 2. the fact, its message and status; the adapter; the job with what it changed
    open_tab(b, "memory")
    [fact] = texts(b, "#facts > li")
    assert "I'm vegetarian." in fact and "in use" in fact and "from your message “I'm vegetarian.”" in fact
    [adapter] = api(url, "GET", "/v1/users/ann/memory").json()["artifacts"]
    assert texts(b, "#adapters li")[0].startswith(f"edit lora #{adapter['id']}, made ")
    wait(b, lambda d: "I'm vegetarian." in " ".join(texts(d, "#items li")), "the history item")
    shots(b, "3-memory")
    open_tab(b, "jobs")
    [job] = texts(b, "#jobs tbody tr")
    assert "done" in job and f"made adapter #{adapter['id']}" in job and " s" in job
    shots(b, "4-jobs")

    # 3. asked again: the why panel names the adapter and the fact it was made from
    open_tab(b, "chat")
    chat(b, "What should I cook tonight?")
    find(b, ".msg.assistant:last-child .why summary").click()
    why = find(b, ".msg.assistant:last-child .why").text
    assert f"edit lora #{adapter['id']}" in why and "I'm vegetarian. (in the adapter)" in why
    assert "memory+rag" in why
    shots(b, "5-why")

    # 4. corrected: relearned from the new text, the old adapter replaced
    open_tab(b, "memory")
    find(b, "#facts > li button[aria-label^='Edit']").click()
    field = find(b, "#facts form input")
    field.clear()
    field.send_keys("I'm vegan." + Keys.ENTER)
    wait(b, lambda d: texts(d, "#facts .value") == ["vegan"] and "in use" in texts(d, "#facts > li")[0],
         "the corrected fact in use")
    assert "corrected by you" in texts(b, "#facts > li")[0] and "“I'm vegan.”" in texts(b, "#facts > li")[0]
    [corrected] = api(url, "GET", "/v1/users/ann/memory").json()["artifacts"]
    assert corrected["id"] != adapter["id"]
    shots(b, "6-corrected")

    # 5. deleted: no fact, the adapter retired at once, the next reply from the base model
    find(b, "#facts > li button[aria-label^='Delete']").click()
    wait(b, lambda d: texts(d, "#facts > li") == [] and texts(d, "#adapters li") ==
         ["none: replies come from the base model"], "the adapter retired")
    assert api(url, "GET", "/v1/users/ann/memory").json()["artifacts"] == []
    open_tab(b, "chat")
    chat(b, "And tomorrow?")
    find(b, ".msg.assistant:last-child .why summary").click()
    assert "none: the base model" in find(b, ".msg.assistant:last-child .why").text
    open_tab(b, "memory")
    shots(b, "7-deleted")

    # 6. history search, export, forget (with a confirmation)
    find(b, "#search").send_keys("tomorrow" + Keys.ENTER)
    wait(b, lambda d: [t.splitlines()[0] for t in texts(d, "#items li")] == ["And tomorrow?"], "the search")
    find(b, "#export").click()
    export = tmp_path / "downloads" / "localpers-ann.json"
    wait(b, lambda d: export.is_file() and export.stat().st_size > 0, "the download")
    assert json.loads(export.read_text())["user"] == "ann"
    find(b, "#forget").click()
    wait(b, lambda d: find(d, "#forget-dialog").get_attribute("open") is not None, "the confirmation")
    shots(b, "8-forget-confirm")
    find(b, "#forget-cancel").click()
    assert api(url, "GET", "/v1/users/ann/memory").status_code == 200  # cancelled: nothing deleted
    find(b, "#forget").click()
    find(b, "#forget-confirm").click()
    wait(b, lambda d: find(d, "#notice").text == "Everything about ann is forgotten.", "forgotten")
    assert api(url, "GET", "/v1/users/ann/memory").status_code == 404
    assert texts(b, "#facts > li") == [] and texts(b, "#items li") == []
    shots(b, "9-forgotten")

    # nothing refused by the Content-Security-Policy, no request to another origin
    # (the network errors logged are the answers the page expects: 401 before the key, 404 for a forgotten user)
    problems = [e for e in b.get_log("browser") if "Content Security Policy" in e["message"]
                or (e["level"] == "SEVERE" and e["source"] != "network")]
    assert problems == [], "\n".join(e["message"] for e in problems)
    requested = b.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert {str(httpx.URL(r).join("/")).rstrip("/") for r in requested} == {url}
    assert not [r for r in requested if KEY in r]  # the key travels in a header, never in a URL


def test_page_keyboard_labels_and_200_percent_zoom(server, browser, shots):
    """Every control has a label, the tabs follow the arrow keys, and at 200% zoom nothing scrolls sideways; a
    preference whose job fails shows as failed, with the job's reason."""
    from selenium.webdriver.common.keys import Keys

    url, gate = server
    gate.set()
    b = browser
    b.get(url + "/")
    b.execute_script(f"sessionStorage.setItem('localpers.key', '{KEY}'); localStorage.setItem('localpers.user', 'bo')")
    b.get(url + "/")
    wait(b, lambda d: find(d, "body").get_attribute("data-ready") == "true", "the page ready")
    unlabeled = b.execute_script("return [...document.querySelectorAll('input, textarea, select')]"
                                 ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)")
    assert unlabeled == []
    find(b, "#tab-chat").send_keys(Keys.ARROW_RIGHT)
    assert b.switch_to.active_element.get_attribute("id") == "tab-memory"
    assert find(b, "#panel-memory").is_displayed() and not find(b, "#panel-chat").is_displayed()
    b.switch_to.active_element.send_keys(Keys.END)
    assert b.switch_to.active_element.get_attribute("id") == "tab-jobs"
    b.switch_to.active_element.send_keys(Keys.HOME)
    assert find(b, "#panel-chat").is_displayed()
    # 200% zoom: the layout of a 640-pixel-wide window drawn at twice the scale
    b.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 640, "height": 1000, "deviceScaleFactor": 2, "mobile": False})
    # a message longer than the model's context: refused by the server, said, left out of the conversation
    b.execute_script("document.getElementById('chat-input').value = 'so many words '.repeat(1500)")
    find(b, "#chat-input").send_keys(Keys.ENTER)
    wait(b, lambda d: find(d, "#notice").text.startswith("The message was not answered: "), "the refusal")
    assert texts(b, ".msg.user .noted") == ["not answered"] and texts(b, ".msg.assistant") == []
    find(b, "#max-tokens").clear()
    find(b, "#max-tokens").send_keys("6")
    chat(b, "I love hiking in the Alps.")
    wait(b, lambda d: texts(d, ".msg.user .noted")[1:] == [
        "noted: hiking in the Alps — not learned: no edit of 'I love hiking in the Alps.' verified "
        "(a stand-in failure)"], "the failed job's reason")
    open_tab(b, "memory")
    wait(b, lambda d: len(texts(d, "#facts > li")) == 1, "the fact")
    [fact] = texts(b, "#facts > li")
    assert "failed" in fact and "why: no edit of 'I love hiking in the Alps.' verified" in fact
    notes = [{"role": "user", "content": f"note {i}"} for i in range(120)]
    assert httpx.post(f"{url}/v1/users/bo/memories", json={"messages": notes},
                      headers={"Authorization": f"Bearer {KEY}"}).status_code == 201
    find(b, "#search-form button").click()
    wait(b, lambda d: find(d, "#items-empty").text == "The newest 100 of 121 items; search to find others.", "the cap")
    assert texts(b, "#items li")[0].startswith("note 119")
    widths = b.execute_script("return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1]
    shots(b, "zoom-200")


def test_page_refuses_a_name_the_server_refuses_and_edits_and_deletes_by_keyboard(server, browser):
    """A name with a control character is refused in the dialog with the server's message (also one remembered
    from before); Escape closes the fact editor; after a fact is deleted with the keyboard, focus goes to the next
    fact, then to the list's heading."""
    from selenium.webdriver.common.keys import Keys

    url, gate = server
    gate.set()
    b = browser
    b.get(url + "/")
    b.execute_script(f"sessionStorage.setItem('localpers.key', '{KEY}'); "
                     "localStorage.setItem('localpers.user', 'bad\\u0007name')")
    b.get(url + "/")
    wait(b, lambda d: "U+0007" in find(d, "#person-error").text, "the remembered name refused")
    assert find(b, "#person-dialog").get_attribute("open") is not None
    b.execute_script("document.getElementById('person').value = 'al\\u0007ice'")
    find(b, "#person-ok").click()
    wait(b, lambda d: "control character U+0007" in find(d, "#person-error").text, "the typed name refused")
    assert find(b, "#person-dialog").get_attribute("open") is not None
    assert find(b, "body").get_attribute("data-ready") is None
    find(b, "#person").clear()
    find(b, "#person").send_keys("cy" + Keys.ENTER)
    wait(b, lambda d: find(d, "body").get_attribute("data-ready") == "true", "the page ready")
    assert find(b, "#who").text == "Chatting as cy" and find(b, "#person-error").text == ""

    for text in ("I'm vegetarian.", "I live in Lyon.", "I like tea."):
        assert httpx.post(f"{url}/v1/users/cy/memories", json={"text": text, "kind": "preference"},
                          headers={"Authorization": f"Bearer {KEY}"}).status_code == 201
    open_tab(b, "memory")
    wait(b, lambda d: len(texts(d, "#facts > li")) == 3, "the facts")
    find(b, "#facts > li button[aria-label^='Edit']").click()
    find(b, "#facts form input").send_keys(Keys.ESCAPE)
    wait(b, lambda d: texts(d, "#facts form") == [], "the editor closed by Escape")
    assert b.switch_to.active_element.get_attribute("aria-label") == "Edit the fact: I'm vegetarian."
    find(b, "#facts > li button[aria-label='Delete the fact: I live in Lyon.']").send_keys(Keys.ENTER)
    wait(b, lambda d: len(texts(d, "#facts > li")) == 2 and d.switch_to.active_element.get_attribute("aria-label")
         == "Edit the fact: I like tea.", "focus on the next fact")
    find(b, "#facts > li button[aria-label='Delete the fact: I like tea.']").send_keys(Keys.ENTER)
    wait(b, lambda d: len(texts(d, "#facts > li")) == 1
         and d.switch_to.active_element.get_attribute("id") == "facts-title", "focus on the heading")


@pytest.mark.slow
def test_page_with_the_real_edit_job(browser, shots, tmp_path):
    """The same loop with the server's real edit job (torch, ~20 s on 2 idle cores): the fact goes in use, the
    job says what it made, the why panel names the adapter, and deleting the fact retires it."""
    from selenium.webdriver.common.keys import Keys

    app = create_app(data_dir=str(tmp_path / "home"), jobs=True, warm_jobs=True)
    with live_server(app) as url:
        b = browser
        b.get(url + "/")
        wait(b, lambda d: find(d, "#person-dialog").get_attribute("open") is not None, "the person dialog")
        find(b, "#person").send_keys("vera" + Keys.ENTER)
        wait(b, lambda d: find(d, "body").get_attribute("data-ready") == "true", "the page ready")
        find(b, "#max-tokens").clear()
        find(b, "#max-tokens").send_keys("24")
        chat(b, "I'm vegetarian.")
        wait(b, lambda d: texts(d, ".msg.user .noted") == ["noted: vegetarian — in use"], "in use", 900)
        [adapter] = httpx.get(f"{url}/v1/users/vera/memory").json()["artifacts"]
        open_tab(b, "jobs")
        assert f"made adapter #{adapter['id']}, 1 fact(s) edited in" in texts(b, "#jobs tbody tr")[0]
        open_tab(b, "chat")
        find(b, "#new-chat").click()
        chat(b, "What is my diet?")
        find(b, ".msg.assistant:last-child .why summary").click()
        why = find(b, ".msg.assistant:last-child .why").text
        assert f"edit lora #{adapter['id']}" in why and "I'm vegetarian. (in the adapter)" in why
        shots(b, "real-edit-why")
        open_tab(b, "memory")
        find(b, "#facts > li button[aria-label^='Delete']").click()
        wait(b, lambda d: texts(d, "#adapters li") == ["none: replies come from the base model"], "retired")
