"""`python -m hil_tests`: run the HIL scenarios, write the JUnit XML and the JSON report, print a summary table.

    python -m hil_tests                               # every scenario on the simulated rig
    python -m hil_tests --target bench:example-pi-bench --seed 1234 -k network
    python -m hil_tests --soak 4h                     # the long soak alone (hil_tests/soak.py)
    python -m hil_tests -- -x --lf                    # anything after the known options goes to pytest

Exit status: pytest's when it is not 0 or 1 (a usage error, no tests collected, …); otherwise 1 when a scenario
failed or had an infrastructure error, else 0. A flaky scenario (failed, then passed when run again with the same
seed) does not fail the run unless --strict-flaky is given; it is listed in the table and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .report import ARTIFACTS as OUT

ROOT = Path(__file__).parent.parent
SOAK_TEST = "hil_tests/test_soak.py::test_soak_loses_nothing_stays_bounded_and_recovers"


def _num(v: Any, fmt: str = "{:.3g}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


def _line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


def main_figures(fig: dict[str, Any]) -> dict[str, Any]:
    """lost, duplicates, latency p50/p99, recovery from a scenario's figures, whichever of the usual shapes it used."""
    lat = fig.get("latency_s")
    if isinstance(lat, dict) and isinstance(lat.get("all"), dict):
        lat = lat["all"]
    lat = lat if isinstance(lat, dict) else {}
    rec = fig.get("recovery_s", fig.get("max_recovery_s"))
    if rec is None:  # one figure per fault: "recovery_s.<fault>"
        rec = [v for k, v in fig.items() if k.startswith("recovery_s.")] or None
    if isinstance(rec, dict):
        rec = max((v for v in rec.values() if isinstance(v, (int, float))), default=None)
    elif isinstance(rec, list):
        rec = max((v for v in rec if isinstance(v, (int, float))), default=None)
    return {
        "lost": fig.get("lost"),
        "dups": fig.get("duplicates", fig.get("duplicate_seqs")),
        "p50": fig.get("latency_p50_s", lat.get("p50")),
        "p99": fig.get("latency_p99_s", lat.get("p99")),
        "recovery": rec,
    }


def summary(report: dict[str, Any]) -> str:
    sw = report["software"]
    software = (f"{sw['git_commit'][:12]}{' (dirty)' if sw.get('dirty') else ''}" if sw.get("git_commit")
                else f"tree {sw.get('tree_sha256', '')[:12]}")
    seed = report["seed"] if report["seed"] is not None else "per scenario"
    rows = [f"HIL {report['target']}  firmware {report['firmware']['sha256'][:12]}  software {software}  seed {seed}"]
    names = [s["nodeid"].removeprefix("hil_tests/") for s in report["scenarios"]]
    w = min(max((len(n) for n in names), default=10), 100)
    rows.append(f"{'scenario':<{w}} {'outcome':<7} {'seed':>10} {'lost':>5} {'dups':>5} {'p50 s':>7} {'p99 s':>7} "
                f"{'recov s':>8} {'time s':>7}")
    for name, s in zip(names, report["scenarios"]):
        f = main_figures(s["figures"])
        name = name if len(name) <= w else name[:w - 1] + "…"
        rows.append(f"{name:<{w}} {s['outcome']:<7} {_num(s['seed']):>10} {_num(f['lost']):>5} "
                    f"{_num(f['dups']):>5} {_num(f['p50']):>7} {_num(f['p99']):>7} {_num(f['recovery']):>8} "
                    f"{s['duration_s']:>7.1f}")
    rows.append("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(report["totals"].items())))
    for s in report["scenarios"]:
        if s["outcome"] == "flaky":
            first = (s.get("first_attempt") or {}).get("reason", "")
            rows.append(f"FLAKY {s['nodeid']}: failed first ({_line(first)}), "
                        f"passed when run again with seed {s['seed']}")
        elif s["outcome"] in ("fail", "infra"):
            rows.append(f"{s['outcome'].upper()} {s['nodeid']}: {_line(s['reason'])}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hil_tests", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="sim (default) or bench:NAME (hil_tests/benches/NAME.toml)")
    p.add_argument("--seed", type=int, help="YUJING_HIL_SEED for every scenario (default: each scenario's own)")
    p.add_argument("--soak", metavar="DURATION", help="run only the soak, this long (90s, 45m, 4h, 1h30m)")
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k: only the scenarios matching EXPR")
    p.add_argument("--strict-flaky", action="store_true", help="a flaky scenario fails the run")
    p.add_argument("--report", type=Path, default=OUT / "report.json", help="the JSON report (default: %(default)s)")
    p.add_argument("--junit", type=Path, default=OUT / "junit.xml", help="the JUnit XML (default: %(default)s)")
    args, extra = p.parse_known_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "pytest", "-p", "hil_tests.plugin", "-ra", f"--junitxml={args.junit}",
           "--hil-report", str(args.report)]
    if args.target:
        cmd += ["--target", args.target]
    if args.seed is not None:
        env["YUJING_HIL_SEED"] = str(args.seed)
    if args.keyword:
        cmd += ["-k", args.keyword]
    paths = ["hil_tests"]
    if args.soak:
        from .soak import parse_duration

        try:
            parse_duration(args.soak)
        except ValueError as exc:
            p.error(str(exc))
        env["YUJING_HIL_SOAK"] = args.soak
        paths = [SOAK_TEST]
        cmd += ["--hil-no-rerun", "-s"]  # a failed 4 h soak is not run for another 4 h; -s: the table as it ends
    if not any(not a.startswith("-") and (ROOT / a.split("::")[0]).exists() for a in extra):
        cmd += paths
    cmd += extra
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.unlink(missing_ok=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    if not args.report.exists():
        print(f"python -m hil_tests: no report (pytest exited {rc} before any scenario ran)", file=sys.stderr)
        return rc or 1
    report = json.loads(args.report.read_text())
    print()
    print(summary(report))
    print(f"report {args.report}, JUnit {args.junit}")
    if rc not in (0, 1):
        return rc
    bad = report["totals"].get("fail", 0) + report["totals"].get("infra", 0)
    if args.strict_flaky:
        bad += report["totals"].get("flaky", 0)
    return 1 if bad or rc else 0


if __name__ == "__main__":
    sys.exit(main())
