"""What an outside tool sees of the provis master through the NATS services
protocol: `$SRV.PING`, `$SRV.INFO.provis-master`, `$SRV.STATS.provis-master`.

Usage: python3 discover_master.py NATS_URL
Prints one JSON document: {"ping": [...], "info": {...}, "stats": {...}}.
"""

import asyncio
import json
import sys

import nats


async def gather(nc, subject, wait=1.0):
    """Every answer to a request on `subject` within `wait` seconds."""
    inbox = nc.new_inbox()
    answers = []
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    try:
        while True:
            msg = await sub.next_msg(timeout=wait)
            answers.append(json.loads(msg.data))
    except nats.errors.TimeoutError:
        pass
    await sub.unsubscribe()
    return answers


async def main(url):
    nc = await nats.connect(url)
    ping = await gather(nc, "$SRV.PING")
    info = await nc.request("$SRV.INFO.provis-master", b"", timeout=5)
    stats = await nc.request("$SRV.STATS.provis-master", b"", timeout=5)
    print(json.dumps({
        "ping": ping,
        "info": json.loads(info.data),
        "stats": json.loads(stats.data),
    }))
    await nc.close()


asyncio.run(main(sys.argv[1]))
