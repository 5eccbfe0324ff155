// Run a Python file under real MicroPython (the WebAssembly port, pinned in package.json) as if
// on a board: host directories are copied into a clean board filesystem, the script runs as
// __main__ with sys.argv set, and the process exits with the script's sys.exit code (1 on an
// uncaught exception, whose traceback goes to stderr).
//
//   node run.mjs [--mount HOSTDIR[:/BOARDDIR]]... [--out HOSTDIR] [--heap BYTES] script.py [args...]
//
// --mount copies HOSTDIR's tree into the board at BOARDDIR (default "/"), skipping node_modules,
//         __pycache__ and dot-files. Modules import from "/" and "/lib", as on a board.
// --out   after the run, copies the board filesystem back to HOSTDIR (to inspect what it wrote).
// --heap  the initial MicroPython heap (default 4 MiB; this port grows it on demand).
//
// Differences from a board that this runner papers over (quirks of the WebAssembly port):
// - emscripten's VFS raises WASI errno numbers (ENOENT = 44); a preamble re-raises them with the
//   numbers MicroPython's errno module uses (ENOENT = 2), for open() and the os functions;
// - the emscripten root holds /dev, /proc, /tmp and /home: the board root is /flash, remounted at /;
// - VfsPosix(root) in 1.27 clobbers the old path of os.rename() with an absolute new path: the
//   preamble renames with paths relative to "/".
// - this port cannot scan the C stack while Python runs, so gc.collect() is deferred until
//   control returns to JS. A script that needs real collections (a heap measurement) defines
//   host_step(): after the script, the runner calls it again and again, returning to JS in
//   between (so a pending collection runs), until it returns a false value.
// Code runs synchronously and cannot be interrupted: callers guard runs with a timeout.
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";
import fs from "node:fs";
import path from "node:path";

const SKIP = new Set(["node_modules", "__pycache__"]);

// WASI errno -> MicroPython errno (Linux numbering).
const ERRNO = { 2: 13, 6: 11, 8: 9, 20: 17, 28: 22, 29: 5, 31: 21, 37: 36, 44: 2, 48: 12, 51: 28, 54: 20, 55: 39, 63: 1, 69: 30, 75: 18 };

const PREAMBLE = `
import sys, os, builtins
_ERRNO = ${JSON.stringify(ERRNO).replace(/"/g, "")}
def _errno_fix(f):
    def call(*args):
        try:
            return f(*args)
        except OSError as e:
            n = e.args[0] if e.args else None
            if n in _ERRNO:
                raise OSError(_ERRNO[n])
            raise
    return call
class _Os:
    pass
_os = _Os()
for _n in dir(os):
    if not _n.startswith("__"):
        setattr(_os, _n, getattr(os, _n))
for _n in ("stat", "remove", "unlink", "rename", "listdir", "ilistdir", "mkdir", "rmdir", "statvfs", "chdir"):
    if hasattr(os, _n):
        setattr(_os, _n, _errno_fix(getattr(os, _n)))
_rename = _os.rename
def _rename_rel(a, b):
    # VfsPosix(root) builds both paths in one buffer, so an absolute old path is clobbered by the
    # new one (ENOENT): rename relative to "/" instead.
    cwd = os.getcwd()
    a = a if a.startswith("/") else cwd.rstrip("/") + "/" + a
    b = b if b.startswith("/") else cwd.rstrip("/") + "/" + b
    os.chdir("/")
    try:
        _rename(a[1:], b[1:])
    finally:
        os.chdir(cwd)
_os.rename = _rename_rel
sys.modules["os"] = _os
builtins.open = _errno_fix(open)
del _n, _Os, _errno_fix
`;

function usage(msg) {
  process.stderr.write(`run.mjs: ${msg}\nusage: node run.mjs [--mount HOSTDIR[:/BOARDDIR]]... [--out HOSTDIR] [--heap BYTES] script.py [args...]\n`);
  process.exit(2);
}

const argv = process.argv.slice(2);
const mounts = [];
let out = null;
let heap = 4 * 1024 * 1024;
while (argv.length && argv[0].startsWith("--")) {
  const opt = argv.shift();
  const val = argv.shift();
  if (val === undefined) usage(`${opt} needs a value`);
  if (opt === "--mount") {
    const i = val.lastIndexOf(":");
    mounts.push(i > 0 ? [val.slice(0, i), val.slice(i + 1)] : [val, "/"]);
  } else if (opt === "--out") out = val;
  else if (opt === "--heap") heap = Number(val);
  else usage(`unknown option ${opt}`);
}
const script = argv.shift();
if (!script) usage("no script given");

const write = (stream) => (bytes) => stream.write(Buffer.from(bytes));
const mp = await loadMicroPython({ heapsize: heap, linebuffer: false, stdout: write(process.stdout), stderr: write(process.stderr) });

const ROOT = "/flash";
mp.FS.mkdirTree(ROOT);

function copyIn(src, dst) {
  const st = fs.statSync(src);
  if (st.isDirectory()) {
    mp.FS.mkdirTree(dst);
    for (const name of fs.readdirSync(src)) {
      if (SKIP.has(name) || name.startsWith(".")) continue;
      copyIn(path.join(src, name), `${dst}/${name}`);
    }
  } else {
    mp.FS.writeFile(dst, fs.readFileSync(src));
  }
}

function copyOut(src, dst) {
  fs.mkdirSync(dst, { recursive: true });
  for (const name of mp.FS.readdir(src)) {
    if (name === "." || name === "..") continue;
    const p = `${src}/${name}`;
    if (mp.FS.isDir(mp.FS.stat(p).mode)) copyOut(p, path.join(dst, name));
    else fs.writeFileSync(path.join(dst, name), mp.FS.readFile(p));
  }
}

for (const [host, board] of mounts) {
  if (!fs.existsSync(host)) usage(`--mount ${host}: no such file or directory`);
  copyIn(host, (ROOT + "/" + board).replace(/\/+/g, "/").replace(/\/$/, ""));
}
mp.FS.chdir(ROOT);

function exitCode(err) {
  if (err && err.type === "SystemExit") {
    const m = /SystemExit:?\s*(-?\d+)?\s*$/.exec(String(err.message).trim());
    if (m) return m[1] === undefined ? 0 : Number(m[1]) & 0xff;
    process.stderr.write(String(err.message) + "\n");
    return 1;
  }
  process.stderr.write(String(err && err.message !== undefined ? err.message : err) + "\n");
  return 1;
}

let rc = 0;
try {
  mp.runPython(`import vfs, os\nvfs.umount("/")\nvfs.mount(vfs.VfsPosix("${ROOT}"), "/")\nos.chdir("/")\n`);
  mp.runPython(PREAMBLE);
  mp.registerJsModule("_yj_runner", { source: fs.readFileSync(script, "utf8"), name: script });
  mp.runPython(`import sys\nsys.argv[:] = ${JSON.stringify([script, ...argv])}\n`);
  mp.runPython(`import _yj_runner\nexec(compile(_yj_runner.source, _yj_runner.name, "exec"))\n`);
  // host_step protocol: see the header.
  while (mp.runPython(`_yj_more = bool(host_step()) if "host_step" in globals() else False`) === null && mp.globals.get("_yj_more")) {}
} catch (err) {
  rc = exitCode(err);
}
if (out) copyOut(ROOT, out);
process.exitCode = rc;
