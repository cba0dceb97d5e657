"""The page does not slow the API: measured on the default model over real HTTP (`localpers serve`'s app under
uvicorn, its job worker on, no job queued).

1. api: p50/p95 of a short streamed chat (16 tokens, greedy) from a plain API client, nothing else running;
2. api + page open: the same while a page is open in another client: it loaded the page and polls the memory
   snapshot every second (what the page does while a job is pending; idle, it polls every 5 s);
3. page load: the documents and first reads of a page load over HTTP (/, page.js, page.css, icon.svg, /v1/page,
   the memory snapshot, the history list), and with --browser the load in headless chromium (navigation to the
   page's `data-ready`);
4. page chat round trip: the chat as the page sends it (stream + explain) and the reads that follow it (memory
   snapshot, the history list for the why panel), against the plain API chat of 1.

    PYTHONPATH=. python3 bench/bench_page.py [--requests 20] [--browser] [--out bench_page.json]

1, 2 and 4 are interleaved request by request, so that a shared machine's changing load falls on each alike.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time

import httpx

from localpers.engine.engine import Engine
from localpers.serve.server import create_app
from tests.serve_helpers import live_server

USER = "bench"
CHAT = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 16, "temperature": 0,
        "user": USER, "stream": True, "localpers": {"history": False}}
PAGE_CHAT = {**CHAT, "localpers": {"history": False, "explain": True}}
ASSETS = ["/", "/static/page.js", "/static/page.css", "/static/icon.svg", "/v1/page"]


def stats(values: list[float]) -> dict:
    p95 = statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]
    return {"n": len(values), "p50_ms": round(1e3 * statistics.median(values), 1), "p95_ms": round(1e3 * p95, 1)}


def streamed_chat(client: httpx.Client, body: dict) -> None:
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                return
    raise AssertionError("the stream ended without [DONE]")


def timed(work, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        work()
        out.append(time.perf_counter() - start)
    return out


def page_load(client: httpx.Client) -> None:
    for path in ASSETS + [f"/v1/users/{USER}/memory", f"/v1/users/{USER}/memories"]:
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])


def browser_loads(url: str, n: int) -> list[float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp(prefix="bench-page-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(url + "/")
        driver.execute_script(f"localStorage.setItem('localpers.user', '{USER}')")
        out = []
        for _ in range(n):
            start = time.perf_counter()
            driver.get(url + "/")
            WebDriverWait(driver, 60, poll_frequency=0.01).until(
                lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
            out.append(time.perf_counter() - start)
        return out
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--browser", action="store_true", help="also time page loads in headless chromium")
    parser.add_argument("--out")
    args = parser.parse_args()
    app = create_app(engine=Engine(n_ctx=1024), data_dir=tempfile.mkdtemp(prefix="bench-page-"), jobs=True)
    result = {}
    with live_server(app) as url, httpx.Client(base_url=url, timeout=600) as client, \
            httpx.Client(base_url=url, timeout=600) as page:
        client.post(f"/v1/users/{USER}/memories", json={"text": "I like the color of the sea."})
        timed(lambda: streamed_chat(client, CHAT), 2)  # warm the engine and its KV cache
        page_load(page)
        page_open, done = threading.Event(), threading.Event()

        def poll():  # an open page polling its memory snapshot every second, while page_open is set
            while not done.wait(1.0):
                if page_open.is_set():
                    page.get(f"/v1/users/{USER}/memory")

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()

        def page_chat():
            streamed_chat(client, PAGE_CHAT)
            client.get(f"/v1/users/{USER}/memory")
            client.get(f"/v1/users/{USER}/memories")

        # interleaved (api, api with the page open, the page's chat), so that the machine's load drifts alike
        runs = {"api": [], "api_with_page_open": [], "page_chat_round_trip": []}
        for _ in range(args.requests):
            runs["api"] += timed(lambda: streamed_chat(client, CHAT), 1)
            page_open.set()
            runs["api_with_page_open"] += timed(lambda: streamed_chat(client, CHAT), 1)
            page_open.clear()
            runs["page_chat_round_trip"] += timed(page_chat, 1)
        done.set()
        poller.join()
        result.update({name: stats(values) for name, values in runs.items()})
        result["page_load_http"] = stats(timed(lambda: page_load(client), args.requests))
        if args.browser:
            result["page_load_chromium"] = stats(browser_loads(url, args.requests))
    result["p95_ratio_page_open"] = round(result["api_with_page_open"]["p95_ms"] / result["api"]["p95_ms"], 2)
    result["p50_ratio_page_open"] = round(result["api_with_page_open"]["p50_ms"] / result["api"]["p50_ms"], 2)
    result["p50_overhead_page_chat_ms"] = round(result["page_chat_round_trip"]["p50_ms"] - result["api"]["p50_ms"], 1)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    os._exit(0)  # the worker's second context may be loading in its daemon thread


if __name__ == "__main__":
    main()
