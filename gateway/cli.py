"""`yujing`: the command a technician (or systemd) runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # paho/aiomqtt chatter stays out of the operator's log unless asked for
    if not verbose:
        logging.getLogger("mqtt").setLevel(logging.WARNING)


def cmd_check(args: argparse.Namespace) -> int:
    from .config import ConfigError, load

    status = 0
    for path in args.files:
        try:
            cfg = load(path)
        except ConfigError as exc:
            for line in exc.lines():
                print(line, file=sys.stderr)
            print(f"{path}: {len(exc.problems)} problem(s); nothing was started", file=sys.stderr)
            status = 1
            continue
        from device_drivers.plan import plan_requests

        requests = sum(
            len(plan_requests(d.points, coalesce=d.coalesce, max_gap=d.max_gap, max_registers=d.max_registers, max_bits=d.max_bits))
            for d in cfg.devices
        )
        print(
            f"{path}: OK — site {cfg.site.id}, gateway {cfg.site.gateway}, {len(cfg.buses)} buses, "
            f"{len(cfg.devices)} devices, {len(cfg.catalogue)} points in {requests} requests per poll round, "
            f"{len(cfg.rules)} alarm rules, {len(cfg.actions)} actions; "
            f"uplink {cfg.uplink.host}:{cfg.uplink.port} ({'TLS' if cfg.uplink.tls else 'no TLS'}, MQTT {cfg.uplink.protocol})"
        )
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from .app import Gateway, run_until_signalled
    from .config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return 2
    asyncio.run(run_until_signalled(Gateway(cfg)))
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    import aiomqtt

    from .consumer import Decoder, consume, load_schema, parse_broker

    try:
        host, port = parse_broker(args.broker)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.share and args.protocol != "5":
        print("--share needs MQTT 5 shared subscriptions: leave --protocol at 5", file=sys.stderr)
        return 2
    schema = None if args.no_validate else load_schema()
    decoder = Decoder(validate=(lambda b: schema.validate_cbor(b)) if schema is not None else None)
    topic = args.topic
    if args.share:
        topic = f"$share/{args.share}/{topic}"
    password = Path(args.password_file).read_text().strip() if args.password_file else None
    tls = None
    if args.tls or args.ca_file:
        import ssl

        tls = ssl.create_default_context(cafile=args.ca_file)
        if args.cert_file:
            tls.load_cert_chain(args.cert_file, args.key_file)

    def factory() -> aiomqtt.Client:
        return aiomqtt.Client(
            host, port, username=args.username, password=password, tls_context=tls,
            protocol=aiomqtt.ProtocolVersion.V5 if args.protocol == "5" else aiomqtt.ProtocolVersion.V311,
            identifier=args.client_id or None, clean_session=None if args.protocol == "5" else True,
        )

    def out(rec: dict) -> None:
        print(json.dumps(rec, ensure_ascii=False, separators=(",", ":")), flush=True)

    def notice(text: str) -> None:
        print(f"yujing consume: {text}", file=sys.stderr, flush=True)

    async def main() -> None:
        task = asyncio.create_task(consume(factory, [topic], decoder, out, notice))
        try:
            if args.duration:
                done, _ = await asyncio.wait({task}, timeout=args.duration)
                if not done:
                    task.cancel()
            await task
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except aiomqtt.MqttError as exc:
        print(f"yujing consume: broker {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_ack(args: argparse.Namespace) -> int:
    """Acknowledge an alarm on this gateway, through its local control socket (works with the uplink down)."""
    from .alarms import control_request
    from .config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return 2
    sock = cfg.state_dir / "control.sock"
    request = {"status": True} if args.rule is None else {"ack": args.rule, "by": args.by}
    try:
        reply = asyncio.run(control_request(sock, request))
    except (OSError, TimeoutError) as exc:
        print(f"cannot reach the gateway at {sock}: {exc} (is `yujing run {args.config}` running, as this user?)", file=sys.stderr)
        return 1
    if args.rule is None:
        for a in reply.get("alarms", []):
            print(f"{a['rule']:<28} {a['colour']:<7} {'latched ' if a['latched'] else ''}{'acked ' if a['acked'] else ''}"
                  f"{'FAULT ' + (a['fault_reason'] or '') if a['fault'] else ''}")
        return 0
    print(reply.get("message", reply), file=sys.stdout if reply.get("ok") else sys.stderr)
    return 0 if reply.get("ok") else 1


def cmd_send_ack(args: argparse.Namespace) -> int:
    """Platform side: send a signed acknowledgement over MQTT and print the gateway's reply."""
    import time
    import uuid

    import aiomqtt

    from . import wire
    from .consumer import parse_broker

    host, port = parse_broker(args.broker)
    key = Path(args.key_file).read_bytes().strip()
    request_id = uuid.uuid4().hex[:16]
    payload = wire.sign_command(wire.command_body("ack", args.rule, args.by, request_id, time.time_ns() // 1_000_000), key)
    prefix = f"{args.prefix}/{args.site}/{args.gateway}"

    async def main() -> tuple[bool, str]:
        async with aiomqtt.Client(host, port) as client:
            await client.subscribe(f"{prefix}/reply", qos=1)
            await client.publish(f"{prefix}/cmd", payload, qos=1)
            async with asyncio.timeout(args.timeout):
                async for m in client.messages:
                    rid, ok, message = wire.decode_reply(bytes(m.payload))
                    if rid == request_id:
                        return ok, message
        return False, "no reply"

    try:
        ok, message = asyncio.run(main())
    except TimeoutError:
        print(f"no reply from {prefix} within {args.timeout}s", file=sys.stderr)
        return 1
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return asyncio.run(run_demo(duration=args.duration, workdir=args.workdir, broker=args.broker))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yujing", description="Yujing (预警) edge gateway for disaster early warning")
    p.add_argument("--version", action="version", version=f"yujing {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("check", help="validate site configuration files")
    s.add_argument("files", nargs="+", metavar="SITE.toml")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("run", help="run the gateway in the foreground (SIGTERM/Ctrl-C stops it cleanly)")
    s.add_argument("config", metavar="SITE.toml")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("consume", help="subscribe, validate, decode and print readings as JSON lines")
    s.add_argument("--broker", required=True, metavar="HOST:PORT")
    s.add_argument("--topic", default="yujing/v1/#", metavar="FILTER")
    s.add_argument("--share", metavar="GROUP", help="MQTT 5 shared subscription group: consumers in one group split the stream")
    s.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    s.add_argument("--username")
    s.add_argument("--password-file")
    s.add_argument("--tls", action="store_true")
    s.add_argument("--ca-file")
    s.add_argument("--cert-file")
    s.add_argument("--key-file")
    s.add_argument("--client-id")
    s.add_argument("--no-validate", action="store_true", help="skip CDDL validation")
    s.add_argument("--duration", type=float, help="stop after SECONDS")
    s.set_defaults(func=cmd_consume)

    s = sub.add_parser("ack", help="acknowledge a latched alarm on this gateway (no RULE: list the alarms)")
    s.add_argument("config", metavar="SITE.toml")
    s.add_argument("rule", nargs="?", metavar="RULE")
    s.add_argument("--by", default=os.environ.get("USER", "local"), help="who acknowledges (default: $USER)")
    s.set_defaults(func=cmd_ack)

    s = sub.add_parser("send-ack", help="platform side: send a signed acknowledgement to a gateway over MQTT")
    s.add_argument("--broker", required=True, metavar="HOST:PORT")
    s.add_argument("--site", required=True)
    s.add_argument("--gateway", required=True)
    s.add_argument("--key-file", required=True, help="the gateway's command key (its uplink.command_key_file)")
    s.add_argument("--prefix", default="yujing/v1")
    s.add_argument("--by", required=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("rule", metavar="RULE")
    s.set_defaults(func=cmd_send_ack)

    s = sub.add_parser("demo", help="a whole simulated site: devices, gateway, broker and consumer, no hardware")
    s.add_argument("--duration", type=float, help="stop by itself after SECONDS")
    s.add_argument("--workdir", help="where to keep the demo's config and spool (default: a temporary directory)")
    s.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
