"""What an observer may not do: publish (a call to every minion) or ask the
master. Prints one JSON document: {"publish": <error>, "request": <error>}
(null where nothing was refused).

Usage: python3 observer_refused.py SERVER CA SEED
"""

import asyncio
import json
import ssl
import sys

import nats
import nkeys


async def main(server, ca, seed):
    with open(seed, "rb") as f:
        public = nkeys.from_seed(f.read().strip()).public_key.decode()
    errors = []

    async def on_error(err):
        errors.append(str(err))

    nc = await nats.connect(
        server,
        tls=ssl.create_default_context(cafile=ca),
        nkeys_seed=seed,
        inbox_prefix=f"_INBOX.{public}",
        error_cb=on_error,
        allow_reconnect=False,
    )
    await nc.publish("provis.all.call", b"not a call")
    await nc.flush()
    await asyncio.sleep(0.5)
    published = next((e for e in errors if "ermission" in e), None)
    try:
        await nc.request("provis.master.ping", b"{}", timeout=2)
        requested = None
    except Exception as err:  # noqa: BLE001 - any refusal will do; which one is printed
        requested = f"{type(err).__name__}: {err}"
    await asyncio.sleep(0.5)
    print(json.dumps({"publish": published, "request": requested, "errors": errors}))
    await nc.close()


asyncio.run(main(*sys.argv[1:4]))
