"""Screenshots of a real bnlab-ui in headless Chromium (Debian's `chromium`), over a temporary store
with a smoke sweep and its report: the study's runs table (parent expanded), one run's charts and
the parent's report artifacts. Checks that the pages show the run names; prints what it saw.

    python benchmarks/ui_screenshots.py [--out DIR] [--keep]

Drives Chromium through its DevTools protocol (aiohttp's websocket client, an MLflow dependency),
since expanding the sweep's row needs a click. Not part of the test suite: it needs a browser.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
WIDTH, HEIGHT = 1400, 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args: str, env: dict) -> None:
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")


def rest(base: str, path: str, payload: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(payload).encode() if payload else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if payload else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


class Browser:
    """One headless Chromium page driven over the DevTools protocol."""

    def __init__(self, profile: Path):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if not exe:
            sys.exit("chromium not found: apt-get install -y chromium")
        self.proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      f"--window-size={WIDTH},{HEIGHT}", "--remote-debugging-port=0",
                                      f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        end = time.time() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.time() > end:
                sys.exit("chromium did not open its DevTools port")
            time.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])
        self.n = 0
        self.debug = None  # a screenshot of the page when a wait times out

    async def __aenter__(self):
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                        deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        await self.session.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)

    async def call(self, method: str, **params):
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expr: str):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    async def until(self, expr: str, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if await self.js(expr):
                return
            await asyncio.sleep(0.5)
        if self.debug:
            await self.shot(self.debug)
        raise TimeoutError(f"page never satisfied: {expr}" + (f" (what it showed: {self.debug})" if self.debug else ""))

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.until("document.readyState === 'complete'")

    async def text(self) -> str:
        return await self.js("document.body.innerText") or ""

    async def shot(self, path: Path) -> None:
        await asyncio.sleep(1.5)  # let charts finish their transitions
        data = (await self.call("Page.captureScreenshot", format="png"))["data"]
        path.write_bytes(base64.b64decode(data))


def has_all(names) -> str:
    return "(() => { const t = document.body.innerText; return %s.every(n => t.includes(n)); })()" % json.dumps(names)


async def drive(base: str, runs_url: str, parent: dict, kids: list, out: Path, profile: Path) -> list:
    kid_names = sorted(k["info"]["run_name"] for k in kids)
    pname = parent["info"]["run_name"]
    exp_id = parent["info"]["experiment_id"]
    seen = []
    async with Browser(profile) as b:
        b.debug = out / "timeout.png"
        await b.goto(runs_url)
        await b.until(has_all([pname, "val/acc"]))
        # MLflow's chat side panel takes a third of the page: close it (a real user's one click)
        await b.js("(() => { const x = document.querySelector('button[aria-label=\"Close\"]'); x && x.click(); })()")
        # expand the sweep's row: the + button in the name cell of the parent
        await b.js("(() => { const a = [...document.querySelectorAll('a')].find(x => x.textContent === %s);"
                   " a.closest('.ag-cell').querySelector('button').click(); })()" % json.dumps(pname))
        await b.until(has_all(kid_names))
        await b.shot(out / "ui_runs.png")
        text = await b.text()
        seen.append(("runs table", all(n in text for n in kid_names + [pname]), out / "ui_runs.png"))
        question = "does the whole pipeline"
        seen.append(("study question on the experiment page", question in text, None))

        kid = next(k for k in kids if k["info"]["run_name"] == kid_names[0])
        ml = "?workflowType=machine_learning"  # else the run page opens in MLflow's GenAI mode
        await b.goto(f"{base}/#/experiments/{exp_id}/runs/{kid['info']['run_id']}/model-metrics{ml}")
        await b.until(has_all([kid_names[0], "Model metrics", "mean_err"]))
        # the answer is in the val/ charts: type val/acc in the chart search box (a React input)
        await b.js("(() => { const i = document.querySelector('input[placeholder=\"Search metric charts\"]');"
                   " Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(i, 'val/acc');"
                   " i.dispatchEvent(new Event('input', {bubbles: true})); })()")
        await b.until(has_all(["acc_precise_bn", "acc_batch_stats"]) + " && !document.body.innerText.includes('mean_err')")
        await b.shot(out / "ui_run_charts.png")
        seen.append(("one run's charts", kid_names[0] in await b.text(), out / "ui_run_charts.png"))

        await b.goto(f"{base}/#/experiments/{exp_id}/runs/{parent['info']['run_id']}/artifacts/report/curves.png{ml}")
        await b.until(has_all([pname, "summary.csv"]))
        await b.shot(out / "ui_parent_report.png")
        seen.append(("the parent's report artifacts", "summary.csv" in await b.text(), out / "ui_parent_report.png"))
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: a temporary one, printed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bnlab-ui-shots-"))
    out = Path(a.out).resolve() if a.out else tmp / "shots"
    out.mkdir(parents=True, exist_ok=True)
    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "BNLAB_HOME": str(home)}
    t0 = time.time()
    # 3 epochs: curves rather than single points in the charts
    sh(str(BIN / "bnlab-train"), "study=smoke", "train.epochs=3", "train.threads=1", env=env)
    sh(str(BIN / "bnlab-report"), "study=smoke", f"out={home / 'results'}", env=env)
    print(f"smoke sweep and report: {time.time() - t0:.0f} s")
    port = free_port()
    ui = subprocess.Popen([str(BIN / "bnlab-ui"), "--port", str(port), "--workers", "1"], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        runs_url = None
        for line in ui.stdout:
            print("  | " + line.rstrip())
            m = re.match(r"\s+smoke\s+(\S+)$", line)
            runs_url = m.group(1) if m else runs_url
            if line.startswith("export MLFLOW_TRACKING_URI="):
                break
        if not runs_url:
            sys.exit("bnlab-ui printed no runs-table URL for smoke")
        base = f"http://127.0.0.1:{port}"
        exp = rest(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke")["experiment"]
        runs = rest(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        role = lambda r: {t["key"]: t["value"] for t in r["data"]["tags"]}.get("bnlab.role")  # noqa: E731
        parent = next(r for r in runs if role(r) == "sweep")
        kids = [r for r in runs if role(r) == "job"]
        seen = asyncio.run(drive(base, runs_url, parent, kids, out, tmp / "chromium"))
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(60)
        shutil.rmtree(tmp / "chromium", ignore_errors=True)
        if not a.keep:
            shutil.rmtree(home, ignore_errors=True)
            if a.out:
                shutil.rmtree(tmp, ignore_errors=True)
    ok = True
    for what, good, path in seen:
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {what}" + (f": {path} ({path.stat().st_size // 1024} KB)" if path else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
