"""`yujing`: the command a technician (or systemd) runs."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from provisioning.cli import add_arguments as provision_arguments  # light: its steps import lazily. At module
# level on purpose: scripts/setup.sh checks `import gateway.cli`, so an editable install from before the
# provisioning package existed fails that check and is reinstalled.

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
            cfg = load(path, writable_state=True)  # a state directory `run` could not create fails the check too
        except ConfigError as exc:
            for line in exc.lines():
                print(line, file=sys.stderr)
            print(f"{path}: {len(exc.problems)} problem(s); nothing was started", file=sys.stderr)
            status = 1
            continue
        from device_drivers.registry import kinds

        buses = {b.name: b for b in cfg.buses}
        requests = 0
        for d in cfg.devices:
            count = getattr(kinds()[buses[d.bus].kind].module, "requests_per_poll", None)
            for g in d.poll_groups():  # each group is read on its own
                part = dataclasses.replace(d, points=tuple(d.points[i] for i in g.points), groups=())
                requests += count(part) if count is not None else 1
        print(
            f"{path}: OK — site {cfg.site.id}, gateway {cfg.site.gateway}, {len(cfg.buses)} buses, "
            f"{len(cfg.devices)} devices, {len(cfg.catalogue)} points in {requests} requests per poll round, "
            f"{len(cfg.rules)} alarm rules, {len(cfg.actions)} actions; "
            f"uplink {cfg.uplink.host}:{cfg.uplink.port} ({'TLS' if cfg.uplink.tls else 'no TLS'}, MQTT {cfg.uplink.protocol})"
            + "".join(f"; {u.kind} uplink {u.name!r}" for u in cfg.uplinks)
            + (f"; status page {'https' if cfg.status.tls_cert_file else 'http'}://{cfg.status.host}:{cfg.status.port}/"
               f"{' (acknowledging on)' if cfg.status.users_file else ''}" if cfg.status.host is not None else "; no status page")
        )
    return status


def _load_or_explain(path: str, *, writable_state: bool = False):  # type: ignore[no-untyped-def]
    """The site configuration, or None after printing every problem (file:line: key: what is wrong).
    `writable_state`: for the command that runs the gateway, whose user must be able to create its state directory."""
    from .config import ConfigError, load

    try:
        return load(path, writable_state=writable_state)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    from .app import Gateway, StartupError, run_until_signalled

    cfg = _load_or_explain(args.config, writable_state=True)
    if cfg is None:
        return 2

    try:
        asyncio.run(run_until_signalled(Gateway(cfg)))
    except StartupError as exc:
        print(f"yujing run: {exc}", file=sys.stderr)
        return 2
    return 0


def _tls_and_password(args: argparse.Namespace) -> tuple[object | None, str | None]:
    """The TLS context and password the MQTT options ask for (shared by consume and send-ack)."""
    password = Path(args.password_file).read_text(encoding="utf-8").strip() if args.password_file else None
    tls = None
    if args.tls or args.ca_file:
        import ssl

        tls = ssl.create_default_context(cafile=args.ca_file)
        if args.cert_file:
            tls.load_cert_chain(args.cert_file, args.key_file)
    return tls, password


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
    try:
        tls, password = _tls_and_password(args)
    except OSError as exc:
        print(f"yujing consume: {exc}", file=sys.stderr)
        return 2
    # A persistent session: while this consumer reconnects (a broker restart, a network blip) the broker
    # keeps its QoS 1 messages, and the decoder keeps its sequence and duplicate accounting.
    client_id = args.client_id or f"yujing-consume-{os.getpid()}"

    def factory() -> aiomqtt.Client:
        v5 = args.protocol == "5"
        properties = None
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = args.session_expiry
        return aiomqtt.Client(
            host, port, username=args.username, password=password, tls_context=tls,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            identifier=client_id, clean_session=None if v5 else False, clean_start=False if v5 else 3,
            properties=properties,
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
    return 0


def cmd_ack(args: argparse.Namespace) -> int:
    """Acknowledge an alarm on this gateway, through its local control socket (works with the uplink down)."""
    from .alarms import control_request

    cfg = _load_or_explain(args.config)
    if cfg is None:
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


def cmd_status(args: argparse.Namespace) -> int:
    """The site at a glance, from the running gateway through its control socket (works with the uplink down)."""
    from .alarms import control_request
    from .status_text import render

    cfg = _load_or_explain(args.config)
    if cfg is None:
        return 2
    sock = cfg.state_dir / "control.sock"
    try:
        reply = asyncio.run(control_request(sock, {"overview": True}, timeout=10.0))
    except (OSError, TimeoutError, ValueError) as exc:
        print(f"cannot reach the gateway at {sock}: {exc} (is `yujing run {args.config}` running, as this user?)", file=sys.stderr)
        return 1
    if not reply.get("ok") or "overview" not in reply:
        print(f"the gateway did not answer with an overview: {reply.get('message', reply)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply["overview"], ensure_ascii=False, indent=2))
    else:
        print(render(reply["overview"], colour=sys.stdout.isatty()))
    return 0


def cmd_status_user(args: argparse.Namespace) -> int:
    """Add or replace a user who may acknowledge from the status page (the password is asked, never shown)."""
    import getpass
    from pathlib import Path

    from .web import users

    path = Path(args.file)
    try:
        known = users.load(path) if path.exists() else {}
    except users.UsersFileError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.remove:
        if known.pop(args.name, None) is None:
            print(f"{path}: no user {args.name!r}", file=sys.stderr)
            return 1
        users.save(path, known)
        print(f"{path}: removed {args.name}")
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ; nothing changed", file=sys.stderr)
            return 1
    existed = args.name in known
    try:
        known[args.name] = users.make_user(args.name, password)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    users.save(path, known)
    print(f"{path}: {'replaced' if existed else 'added'} {args.name} (mode 0600); "
          f"set [status] users_file = \"{path}\" in the site file")
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """The messages the broker refused for good (MQTT 5 reason codes), newest first; read while the gateway runs."""
    from .spool import read_dead_letters

    cfg = _load_or_explain(args.config)
    if cfg is None:
        return 2
    try:
        letters = read_dead_letters(cfg.spool.path, args.limit)
    except OSError as exc:
        print(f"cannot read the dead letters in {cfg.spool.path}: {exc.strerror or exc} (run as the gateway's user)", file=sys.stderr)
        return 1
    if not letters:
        print(f"no refused messages in {cfg.spool.path}")
    for kind, session, seq, reason in letters:
        print(f"{kind:<6} session {session} seq {seq}: {reason}")
    return 0


def cmd_send_ack(args: argparse.Namespace) -> int:
    """Platform side: send a signed (COSE_Sign1, Ed25519) acknowledgement over MQTT; print the gateway's reply."""
    import uuid

    import aiomqtt

    from . import commands, wire
    from .consumer import parse_broker

    try:
        host, port = parse_broker(args.broker)
        key = commands.load_private_key(Path(args.signing_key))
        tls, password = _tls_and_password(args)
    except (ValueError, OSError) as exc:
        print(f"yujing send-ack: {exc}", file=sys.stderr)
        return 2
    request_id = uuid.uuid4().hex[:16]
    payload = commands.sign_command(key, site=args.site, gateway=args.gateway, command="ack", rule=args.rule, by=args.by,
                                    request_id=request_id)
    mine = commands.digest(payload)
    prefix = f"{args.prefix}/{args.site}/{args.gateway}"

    async def main() -> tuple[bool, str]:
        async with aiomqtt.Client(host, port, username=args.username, password=password, tls_context=tls,
                                  protocol=aiomqtt.ProtocolVersion.V5 if args.protocol == "5" else aiomqtt.ProtocolVersion.V311) as client:
            await client.subscribe(f"{prefix}/reply", qos=1)
            await client.publish(f"{prefix}/cmd", payload, qos=1)
            async with asyncio.timeout(args.timeout):
                async for m in client.messages:
                    try:
                        reply = wire.decode_reply(bytes(m.payload))  # type: ignore[arg-type]
                    except wire.WireError:
                        continue
                    if reply.digest == mine or reply.request_id == request_id:
                        return reply.ok, reply.message
        return False, "no reply"

    try:
        ok, message = asyncio.run(main())
    except TimeoutError:
        print(f"no reply from {prefix} within {args.timeout}s (is the gateway connected? is this its site and gateway id?)", file=sys.stderr)
        return 1
    except aiomqtt.MqttError as exc:
        print(f"yujing send-ack: broker {host}:{port}: {exc}", file=sys.stderr)
        return 1
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_command_key(args: argparse.Namespace) -> int:
    """Make the platform's command-signing key pair."""
    from . import commands

    try:
        public, kid = commands.new_key_pair(Path(args.file))
    except (commands.KeyFileError, OSError) as exc:
        print(f"yujing command-key: {exc}", file=sys.stderr)
        return 1
    print(f"signing key (keep it on the platform, mode 0600): {args.file}")
    print(f"public key (give it to the gateways as uplink.command_public_key_file): {public}")
    print(f"key id: {kid.hex()}")
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    """Write the systemd unit for a site file."""
    from .systemd import unit_text

    cfg = _load_or_explain(args.config)
    if cfg is None:
        return 2
    target = Path(args.target)
    unit = target / args.name
    try:
        target.mkdir(parents=True, exist_ok=True)
        unit.write_text(unit_text(Path(args.config), cfg.state_dir, user=None if args.user == "root" else args.user,
                                  watchdog_s=args.watchdog, name=args.name), encoding="utf-8")
    except OSError as exc:
        print(f"yujing service install: {unit}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {unit}")
    if target.resolve() != Path("/etc/systemd/system"):
        print(f"install it with: sudo cp {unit} /etc/systemd/system/ && sudo systemctl daemon-reload")
    else:
        print("now run: sudo systemctl daemon-reload")
    print(f"then: sudo systemctl enable --now {args.name}   (logs: journalctl -u {args.name} -f)")
    if args.user != "root":
        print(f"the service runs as user {args.user!r}: create it (sudo useradd --system --groups dialout {args.user}) and give it "
              f"{cfg.state_dir} (sudo install -d -o {args.user} -m 0700 {cfg.state_dir})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return asyncio.run(run_demo(duration=args.duration, workdir=args.workdir, broker=args.broker))


def _mqtt_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--broker", required=True, metavar="HOST:PORT",
                   help="the MQTT broker to connect to, e.g. 127.0.0.1:1883 (port 8883 with --tls); required, there is "
                        "no default (`yujing demo` prints its broker's)")
    s.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                   help="MQTT version: 5, or 3.1.1 for an older broker (default: %(default)s)")
    s.add_argument("--username", help="MQTT username (default: none, an anonymous connection)")
    s.add_argument("--password-file", help="a file holding the password (never on the command line)")
    s.add_argument("--tls", action="store_true", help="TLS, verified against the system CAs or --ca-file")
    s.add_argument("--ca-file", help="CA certificate to verify the broker with (implies --tls)")
    s.add_argument("--cert-file", help="client certificate (PEM)")
    s.add_argument("--key-file", help="client certificate's private key (PEM)")


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

    s = sub.add_parser("consume", help="subscribe, validate, decode and print readings as JSON lines",
                       description="Decode what gateways and nodes publish and print one JSON line per reading or alarm "
                                   "event (stdout); gaps, duplicates and rejected messages go to stderr. Reconnects by "
                                   "itself with a persistent session, so nothing queued is missed across a broker restart.")
    _mqtt_options(s)
    s.add_argument("--topic", default="yujing/v1/#", metavar="FILTER",
                   help="MQTT topic filter: what to subscribe to (default: %(default)s, every site and gateway under "
                        "the default topic_prefix; e.g. yujing/v1/KM-RES-01/# for one site)")
    s.add_argument("--share", metavar="GROUP", help="MQTT 5 shared subscription group: consumers in one group split the stream")
    s.add_argument("--client-id", help="MQTT client id; give a fixed one to keep the session across restarts of this command")
    s.add_argument("--session-expiry", type=int, default=3600, metavar="S",
                   help="MQTT 5: how long the broker keeps this consumer's session while it is away (default: %(default)s s)")
    s.add_argument("--no-validate", action="store_true", help="skip CDDL validation")
    s.add_argument("--duration", type=float, help="stop after SECONDS")
    s.set_defaults(func=cmd_consume)

    s = sub.add_parser("ack", help="acknowledge a latched alarm on this gateway (no RULE: list the alarms)")
    s.add_argument("config", metavar="SITE.toml")
    s.add_argument("rule", nargs="?", metavar="RULE")
    s.add_argument("--by", default=os.environ.get("USER", "local"), help="who acknowledges (default: $USER)")
    s.set_defaults(func=cmd_ack)

    s = sub.add_parser("status", help="the site at a glance from the running gateway: devices, values, alarms, spool, uplink")
    s.add_argument("config", metavar="SITE.toml")
    s.add_argument("--json", action="store_true", help="the overview as JSON, for scripts")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("status-user", help="add, replace or remove a user who may acknowledge alarms on the status page")
    s.add_argument("file", metavar="USERS_FILE", help="the [status] users_file (created 0600 if missing)")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--remove", action="store_true", help="remove NAME")
    s.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin (scripts)")
    s.set_defaults(func=cmd_status_user)

    s = sub.add_parser("dead-letters", help="list the messages the broker refused for good, newest first, with its reason")
    s.add_argument("config", metavar="SITE.toml")
    s.add_argument("--limit", type=int, default=20, help="how many (default: %(default)s)")
    s.set_defaults(func=cmd_dead_letters)

    s = sub.add_parser("send-ack", help="platform side: send a signed acknowledgement to a gateway over MQTT",
                       description="Sign an acknowledgement with the platform's Ed25519 key (COSE_Sign1) and send it to one "
                                   "gateway; print its reply. The counter against replay is the time in microseconds.")
    _mqtt_options(s)
    s.add_argument("--site", required=True)
    s.add_argument("--gateway", required=True)
    s.add_argument("--signing-key", required=True, metavar="FILE",
                   help="the platform's Ed25519 private key (PEM, mode 0600; made by `yujing command-key new`)")
    s.add_argument("--prefix", default="yujing/v1", help="topic prefix (default: %(default)s)")
    s.add_argument("--by", required=True, help="who acknowledges (1-64 printable characters)")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply (default: %(default)s)")
    s.add_argument("rule", metavar="RULE")
    s.set_defaults(func=cmd_send_ack)

    s = sub.add_parser("command-key", help="make the platform's command-signing key pair")
    ks = s.add_subparsers(dest="action", required=True)
    k = ks.add_parser("new", help="write FILE (private, 0600) and FILE.pub (public, for the gateways)")
    k.add_argument("file", metavar="FILE")
    k.set_defaults(func=cmd_command_key)

    s = sub.add_parser("service", help="systemd: the unit that runs, watches and restarts the gateway")
    ss = s.add_subparsers(dest="action", required=True)
    k = ss.add_parser("install", help="write the unit for a site file (Type=notify, WatchdogSec, Restart=always)")
    k.add_argument("config", metavar="SITE.toml")
    k.add_argument("--target", default="/etc/systemd/system", help="directory to write it to (default: %(default)s)")
    k.add_argument("--name", default="yujing.service", help="unit file name (default: %(default)s)")
    k.add_argument("--user", default="yujing", help="user the gateway runs as ('root' for none; default: %(default)s)")
    k.add_argument("--watchdog", type=int, default=30, metavar="S", help="WatchdogSec (default: %(default)s)")
    k.set_defaults(func=cmd_service)

    s = sub.add_parser("demo", help="a whole simulated site: devices, gateway, broker and consumer, no hardware")
    s.add_argument("--duration", type=float, help="stop by itself after SECONDS")
    s.add_argument("--workdir", help="where to keep the demo's config and spool (default: a temporary directory)")
    s.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto")
    s.set_defaults(func=cmd_demo)

    provision_arguments(sub.add_parser("provision", help="field technician: site CA, node identities, broker "
                                                         "password file and ACL, the site inventory"))
    return p


def main(argv: list[str] | None = None) -> int:
    from .lean import defer_unused_imports

    defer_unused_imports()  # before anything imports paho
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
