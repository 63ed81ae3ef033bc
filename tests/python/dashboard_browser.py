"""Drive the dashboard of a `provis up` fleet in headless Chromium (Debian's,
through Playwright) as an operator would, taking a screenshot of each page.

Usage: python3 dashboard_browser.py LOGIN_URL PROVIS CONTEXT SHOTS_DIR MINION...
Prints one JSON document with what it saw.
"""

import asyncio
import json
import os
import subprocess
import sys
import time

from playwright.async_api import async_playwright

# As this machine's Chromium runs headless: no sandbox (root), and nothing
# that reaches for the network on its own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def main(login_url, provis, context, shots, minions):
    base = login_url.split("/login")[0]
    seen = {}
    os.makedirs(shots, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=os.environ.get("PROVIS_CHROMIUM", "/usr/bin/chromium"),
            args=CHROMIUM_ARGS,
        )
        page = await browser.new_page(viewport={"width": 1280, "height": 900})

        # Without a session every page is refused.
        response = await page.goto(base + "/")
        seen["without_session"] = response.status
        await page.screenshot(path=f"{shots}/refused.png")

        # The printed URL logs in, once, and lands on the fleet.
        response = await page.goto(login_url)
        await page.wait_for_selector("#fleet")
        fleet = await page.inner_text("#fleet")
        seen["fleet_lists"] = [m for m in minions if m in fleet]
        await page.screenshot(path=f"{shots}/fleet.png", full_page=True)

        # A minion's page draws its charts with a point per sample.
        await page.goto(f"{base}/minion/{minions[0]}")
        seen["chart_points"] = await page.locator("svg.chart circle.point").count()
        await page.screenshot(path=f"{shots}/minion.png", full_page=True)

        for name in ["roles", "convergence", "rollouts", "jobs", "query?expression=true"]:
            response = await page.goto(f"{base}/{name}")
            seen[name.split("?")[0]] = response.status
            await page.screenshot(path=f"{shots}/{name.split('?')[0]}.png", full_page=True)

        # Live events: a call made from the CLI shows without a reload.
        await page.goto(f"{base}/events")
        await page.wait_for_function(
            "document.getElementById('live-state').textContent === 'live'", timeout=15000
        )
        rows = "document.querySelectorAll('#events tbody tr.new').length"
        started = time.monotonic()
        subprocess.run(
            [provis, "call", "--all", "sys.ping"],
            env={**os.environ, "PROVIS_CONTEXT": context},
            check=True,
            capture_output=True,
        )
        await page.wait_for_function(
            "[...document.querySelectorAll('#events tbody tr.new')]"
            ".some(r => r.textContent.includes('job.started') && r.textContent.includes('sys.ping'))",
            timeout=15000,
        )
        seen["event_seconds"] = round(time.monotonic() - started, 3)
        seen["live_rows"] = await page.evaluate(rows)
        await page.screenshot(path=f"{shots}/events.png", full_page=True)
        await browser.close()
    print(json.dumps(seen))


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]))
