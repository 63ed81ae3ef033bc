"""Follow a provis fleet as an observer: the last hour of events, then new ones."""

import argparse
import asyncio
import datetime
import json
import ssl

import nats
import nkeys
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


def show(data):
    event = json.loads(data)
    print(event["time"], event["source"], event["type"], json.dumps(event["data"]), flush=True)
    return event["id"]


async def main(args):
    with open(args.seed, "rb") as f:
        public = nkeys.from_seed(f.read().strip()).public_key.decode()
    nc = await nats.connect(
        args.server,
        tls=ssl.create_default_context(cafile=args.ca),
        nkeys_seed=args.seed,
        inbox_prefix=f"_INBOX.{public}",  # the only inbox this key may read
    )
    # Live events wait in this subscription while the history is read.
    live = await nc.subscribe("provis.event.>")

    # The last hour: an ephemeral consumer on PROVIS_EVENTS, read to its end.
    js = nc.jetstream()
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    history = await js.pull_subscribe(
        "provis.event.>",
        stream="PROVIS_EVENTS",  # named: an observer may not look streams up
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=since.isoformat().replace("+00:00", "Z"),
            ack_policy=AckPolicy.NONE,
        ),
    )
    printed = set()
    while True:
        try:
            msgs = await history.fetch(100, timeout=2)
        except asyncio.TimeoutError:
            break  # nothing (more) in the hour
        printed.update(show(msg.data) for msg in msgs)
        if msgs[-1].metadata.num_pending == 0:
            break
    await history.unsubscribe()

    # Then every event as it happens (one stored while the history was read
    # is in both; print it once).
    loop = asyncio.get_running_loop()
    until = loop.time() + args.follow if args.follow else None
    while until is None or loop.time() < until:
        try:
            msg = await live.next_msg(timeout=1)
        except asyncio.TimeoutError:
            continue
        if json.loads(msg.data)["id"] not in printed:
            show(msg.data)
    await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="nats://127.0.0.1:4222")
    parser.add_argument("--ca", default=".provis/up/tls/nats.pem")
    parser.add_argument("--seed", default=".provis/up/observer.nk")
    parser.add_argument("--follow", type=float, default=0, help="seconds of live events (0: until stopped)")
    asyncio.run(main(parser.parse_args()))
