"""`yujing provision …`: argument parsing and printing only; the steps are in provisioning.workflow.

Kept free of heavy imports at module level: `yujing` builds this parser on every start, also on a gateway
that never provisions anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .workflow import Site

DEFAULT_DIR = "yujing-site"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Field provisioning: the site CA, one MQTT identity per node (certificate, username, password), "
                     "mosquitto's password file and ACL, and the site inventory. Secrets stay in the site directory "
                     "(0700, files 0600) and are never printed.")
    p.add_argument("--site-dir", default=os.environ.get("YUJING_SITE_DIR", DEFAULT_DIR), metavar="DIR",
                   help="the site directory: CA, identities, inventory.json (default: $YUJING_SITE_DIR or %(default)s)")
    p.add_argument("--technician", default=os.environ.get("USER", "unknown"),
                   help="who does the work, for the inventory (default: $USER)")
    sub = p.add_subparsers(dest="provision_command", required=True)

    s = sub.add_parser("init-site", help="create the site directory, its CA and the platform account (once)")
    s.add_argument("site", metavar="SITE", help="site id, as in the topics (yujing/v1/SITE/...)")
    s.add_argument("--prefix", default="yujing/v1", help="topic prefix (default: %(default)s)")
    s.set_defaults(func=_init_site)

    s = sub.add_parser("add-node", help="issue a node's identity and record where it is installed (rerun: no-op)")
    s.add_argument("device_id", metavar="ID")
    s.add_argument("--serial", required=True, help="the board's serial or MAC address")
    s.add_argument("--location", required=True, help="where it is installed, in words (e.g. 'slope 3, post 12')")
    s.add_argument("--firmware", type=Path, metavar="PATH", help="firmware file or folder installed (its hash is recorded)")
    s.add_argument("--config", type=Path, metavar="FILE", help="the node's config.json (its hash is recorded)")
    s.set_defaults(func=_add_node)

    s = sub.add_parser("rekey", help="new certificate and password for an installed node (the old ones are revoked)")
    s.add_argument("device_id", metavar="ID")
    s.set_defaults(func=_rekey)

    s = sub.add_parser("replace", help="revoke node OLD and install NEW in its place (a new board or a new id)")
    s.add_argument("old", metavar="OLD")
    s.add_argument("new", metavar="NEW")
    s.add_argument("--serial", help="the new board's serial (default: OLD's board)")
    s.add_argument("--location", help="default: OLD's location")
    s.add_argument("--firmware", type=Path, metavar="PATH")
    s.add_argument("--config", type=Path, metavar="FILE")
    s.set_defaults(func=_replace)

    s = sub.add_parser("broker-files", help="write mosquitto's passwd (0600), acl, ca.crt and crl.pem to OUTDIR")
    s.add_argument("outdir", type=Path, metavar="OUTDIR")
    s.add_argument("--server-name", action="append", default=[], metavar="NAME",
                   help="also issue the broker's TLS certificate for this host name or IP (repeatable)")
    s.set_defaults(func=_broker_files)

    s = sub.add_parser("boards", help="the attached boards: USB serial number, port, by-id path, USB chip")
    _board_choice(s, port=False)
    s.set_defaults(func=_boards)

    s = sub.add_parser("preflight", help="check a board on PORT: MicroPython version, .mpy ABI, free flash, clock, Ctrl-C")
    _board_choice(s)
    s.set_defaults(func=_preflight)

    s = sub.add_parser("flash", help="pre-flight, then copy the firmware (.mpy) and the node's files to the board on "
                                     "PORT; only what changed is copied, each file whole or not at all")
    _board_choice(s)
    s.add_argument("--firmware", type=Path, default=Path("firmware"), metavar="DIR",
                   help="the firmware folder: main.py and yujing_node/ (default: %(default)s)")
    s.add_argument("--config", type=Path, metavar="FILE", help="written to the board as /config.json")
    s.add_argument("--node", metavar="ID", help="write the identity's secrets (MQTT account, command key) as "
                                               "/secrets.json and its TLS files as DER (/ca.der, /cert.der, /key.der); "
                                               "with --config, its mqtt section is set for TLS")
    s.set_defaults(func=_flash)

    s = sub.add_parser("install", help="provision the boards of a plan in parallel: identity, files, firmware, "
                                       "reboot, online check; an interrupted run resumes where it stopped")
    s.add_argument("--plan", type=Path, required=True, metavar="PLAN.toml",
                   help="the nodes (id, USB serial or port, location, config) and the broker (provisioning/README.md)")
    s.add_argument("--fresh", action="store_true", help="ignore the journal: redo every step (each is safe to redo)")
    s.add_argument("--by-id-dir", type=Path, default=Path("/dev/serial/by-id"), help=argparse.SUPPRESS)
    s.set_defaults(func=_install)

    s = sub.add_parser("verify", help="is node ID online: its birth (site, id, kind) and first readings on the broker, "
                                      "read as the platform account")
    s.add_argument("device_id", metavar="ID")
    s.add_argument("--broker", required=True, metavar="HOST:PORT")
    s.add_argument("--no-tls", action="store_true", help="username + password on a plain listener (loopback tests)")
    s.add_argument("--timeout", type=float, default=120.0, metavar="S", help="how long to wait (default: %(default)s)")
    s.add_argument("--kind", default="node", choices=("node", "gateway"))
    s.set_defaults(func=_verify)

    s = sub.add_parser("gateway", help="the gateway's identity, secrets (0600), site file secret paths and systemd "
                                       "unit, written into a target root (/ or a mounted SD card image)")
    s.add_argument("device_id", metavar="ID", help="the gateway id: [site] gateway in its site file")
    s.add_argument("--target", type=Path, required=True, metavar="DIR", help="the gateway's root folder")
    s.add_argument("--site-file", type=Path, default=Path("etc/yujing/site.toml"), metavar="PATH",
                   help="the site file, relative to DIR (default: %(default)s)")
    s.add_argument("--template", type=Path, metavar="FILE", help="start the site file from FILE when it does not exist")
    s.add_argument("--serial", help="the gateway's serial or host name, for the inventory (default: 'gateway ID')")
    s.add_argument("--location", default="gateway", help="where it is installed, in words")
    s.add_argument("--python", default="/usr/bin/python3", help="the gateway's Python (with yujing installed) for "
                                                                "the unit's ExecStart (default: %(default)s)")
    s.add_argument("--user", default="yujing", help="the service's user (default: %(default)s)")
    s.add_argument("--owner", metavar="UID:GID",
                   help="chown the secrets and state folder to it (as root, for an image)")
    s.add_argument("--broker-files", type=Path, metavar="OUTDIR", help="also rewrite the broker files there")
    s.set_defaults(func=_gateway)

    s = sub.add_parser("list", help="the inventory: every device, its board, location and status")
    s.add_argument("--json", action="store_true", help="print inventory.json as it is")
    s.set_defaults(func=_list)


Step = Callable[[argparse.Namespace], int]


def _run(step: Step) -> Step:
    """Run a step under the site lock; turn a ProvisionError into one line on stderr and exit status 2."""
    from . import ProvisionError

    def wrapped(args: argparse.Namespace) -> int:
        try:
            if args.provision_command in ("list", "preflight", "flash", "boards", "verify"):
                return step(args)  # reads the site only, if at all
            with _site(args).locked(create=args.provision_command == "init-site"):
                return step(args)
        except ProvisionError as exc:
            print(f"yujing provision {args.provision_command}: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"yujing provision {args.provision_command}: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
            return 1
    return wrapped


def _site(args: argparse.Namespace) -> Site:
    from .workflow import Site

    return Site(Path(args.site_dir))


@_run
def _init_site(args: argparse.Namespace) -> int:
    print(_site(args).init(args.site, args.prefix).message)
    return 0


@_run
def _add_node(args: argparse.Namespace) -> int:
    print(_site(args).add_node(args.device_id, serial=args.serial, location=args.location, technician=args.technician,
                               firmware=args.firmware, config=args.config).message)
    return 0


@_run
def _rekey(args: argparse.Namespace) -> int:
    print(_site(args).rekey(args.device_id, technician=args.technician).message)
    return 0


@_run
def _replace(args: argparse.Namespace) -> int:
    print(_site(args).replace(args.old, args.new, serial=args.serial, location=args.location,
                              technician=args.technician, firmware=args.firmware, config=args.config).message)
    return 0


@_run
def _broker_files(args: argparse.Namespace) -> int:
    for path in _site(args).broker_files(args.outdir, server_names=tuple(args.server_name)):
        print(f"wrote {path} ({path.stat().st_mode & 0o777:04o})")
    print(f"mosquitto.conf: password_file {args.outdir}/passwd, acl_file {args.outdir}/acl, allow_anonymous false; "
          f"the broker's user must read them (e.g. chown -R mosquitto: {args.outdir}); then reload the broker (SIGHUP)")
    return 0


@_run
def _list(args: argparse.Namespace) -> int:
    site = _site(args)
    inv = site.load()
    if args.json:
        sys.stdout.write(site.inventory_path.read_text(encoding="utf-8"))
        return 0
    print(f"site {inv.site} (prefix {inv.prefix}), CA {inv.ca_fingerprint}")
    for d in sorted(inv.devices.values(), key=lambda d: d.device_id):
        note = f" -> {d.replaced_by}" if d.replaced_by else ""
        print(f"{d.device_id:20} {d.status:9} board {d.board_serial:16} {d.location!r} "
              f"({d.technician}, {d.installed_at}){note}")
    if not inv.devices:
        print("no devices yet: yujing provision add-node ID --serial SERIAL --location WHERE")
    return 0


def _board_choice(s: argparse.ArgumentParser, *, port: bool = True) -> None:
    if port:
        s.add_argument("port", nargs="?", metavar="PORT", help="the board's port, best its /dev/serial/by-id/… path "
                                                               "(default: the one attached board)")
        s.add_argument("--serial", metavar="SERIAL", help="choose the board by its USB serial number (see `boards`)")
    s.add_argument("--by-id-dir", type=Path, default=Path("/dev/serial/by-id"), help=argparse.SUPPRESS)


def _port(args: argparse.Namespace) -> str:
    """The board the technician named (a port or --serial), or the only one attached; never a guess."""
    from . import discover

    if args.port is not None and args.serial is None:
        discover.check_port(args.port)  # a clear message before mpremote's
        return str(args.port)
    return discover.choose(discover.list_boards(args.by_id_dir), serial=args.serial, port=args.port).port


@_run
def _boards(args: argparse.Namespace) -> int:
    from . import discover

    boards = discover.list_boards(args.by_id_dir)
    for b in boards:
        print(b.line())
    if not boards:
        print("no USB serial board attached (check the cable: a charge-only cable has no data lines)")
    elif len(boards) > 1:
        print(f"{len(boards)} boards: name one with --serial SERIAL or its /dev/serial/by-id/… path")
    return 0


@_run
def _preflight(args: argparse.Namespace) -> int:
    from . import board

    print("\n".join(board.preflight(_port(args)).lines()))
    return 0


@_run
def _install(args: argparse.Namespace) -> int:
    from .runner import Runner, load_plan, make_progress, report_lines

    plan = load_plan(args.plan)
    runner = Runner(_site(args), plan, technician=args.technician, by_id_dir=args.by_id_dir, fresh=args.fresh,
                    progress=make_progress(n.node_id for n in plan.nodes))
    try:
        report = runner.run()
    except KeyboardInterrupt:
        print("interrupted: the boards keep their old files where a copy was cut; run the same command again to "
              "resume (the journal is in " f"{runner.journal.path})", file=sys.stderr)
        return 130
    print("\n".join(report_lines(report)))
    return 0 if report.ok else 1


@_run
def _verify(args: argparse.Namespace) -> int:
    from .verify import BrokerAccess, verify_online_sync

    site = _site(args)
    inv = site.load()
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        from . import ProvisionError

        raise ProvisionError(f"--broker {args.broker!r}: HOST:PORT, e.g. broker.xishan.local:8883")
    access = BrokerAccess.platform(site, host, int(port), tls=not args.no_tls)
    # no reboot here: the retained birth of the node's current session counts, then its next live data
    result = verify_online_sync(access, inv.site, args.device_id, timeout_s=args.timeout, prefix=inv.prefix,
                                kind=args.kind, since_ms=0)
    print(result.line())
    return 0 if result.online else 1


@_run
def _gateway(args: argparse.Namespace) -> int:
    from . import ProvisionError
    from .gateway_install import install_gateway

    owner = None
    if args.owner:
        uid, _, gid = args.owner.partition(":")
        if not uid.isdigit() or not (gid or uid).isdigit():
            raise ProvisionError(f"--owner {args.owner!r}: numeric UID:GID (as in the image's /etc/passwd)")
        owner = (int(uid), int(gid or uid))
    result = install_gateway(_site(args), args.device_id, args.target, technician=args.technician,
                             template=args.template, site_file=args.site_file, serial=args.serial,
                             location=args.location, python=args.python, user=args.user, owner=owner,
                             broker_files=args.broker_files)
    print("\n".join(result.lines()))
    return 0


@_run
def _flash(args: argparse.Namespace) -> int:
    from . import ProvisionError, board

    config = args.config.read_bytes() if args.config is not None else None
    extra = {"/config.json": config} if config is not None else {}
    if args.node is not None:
        from .node_files import node_files

        store = _site(args).store
        if not (store.folder(args.node) / "secrets.json").exists():
            raise ProvisionError(f"{store.folder(args.node) / 'secrets.json'} is missing: run `yujing provision "
                                 f"add-node {args.node} …` first")
        # a TLS node: with a config, mqtt.tls set and the DER files where the config says
        extra = node_files(store, args.node, config, f"--config {args.config}", broker=None)
    port = _port(args)
    print("\n".join(board.preflight(port).lines()))
    report = board.sync_firmware(port, board.compile_firmware(args.firmware))
    print(f"firmware: {report.line()}")
    if extra:
        files = board.sync_firmware(port, extra)  # secrets are never printed, only their path on the board
        print(f"node files: {files.line()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m provisioning.cli …`, the same as `yujing provision …`."""
    p = argparse.ArgumentParser(prog="yujing provision")
    add_arguments(p)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
