"""Run the node firmware as an ESP32 would, under the MicroPython unix port, with only the silicon faked.

    micropython -X heapsize=100K firmware/host/unix/board.py FLASH_DIR SIM_DIR

FLASH_DIR is the board's flash (what provisioning writes: /main.py, /lib/yujing_node, /config.json,
/secrets.json, the TLS files), mounted at `/`; SIM_DIR holds what the fake silicon keeps (see _sim.py).
The fakes (machine, network, esp32, ntptime) are imported from this folder *before* the flash hides the
host's filesystem, so the firmware's lazy `import machine` finds them in sys.modules; then /main.py runs
exactly as a board runs it after boot. deepsleep() and reset() end the process: the caller restarts it.
"""

import os
import sys


class Flash:
    """The flash folder as the root filesystem. VfsPosix with a root renames through one path buffer in this
    build (ENOENT), so renames go through a VfsPosix of the host (as provisioning/simboard.py does)."""

    def __init__(self, root):
        self.v = os.VfsPosix(root)
        self.host = os.VfsPosix()
        self.root = root

    def mount(self, readonly, mkfs):
        pass

    def umount(self):
        pass

    def rename(self, a, b):
        self.host.rename(self.root + a, self.root + b)

    def __getattr__(self, name):
        return getattr(self.v, name)


def install(sim_dir):
    """Put the fakes in sys.modules (call while this folder is still on sys.path)."""
    import _sim

    _sim.set_dir(sim_dir)
    import esp32  # noqa: F401
    import machine  # noqa: F401
    import network  # noqa: F401
    import ntptime  # noqa: F401


def mount_flash(flash_dir):
    os.umount("/")
    os.mount(Flash(flash_dir), "/")
    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]


def main(argv):
    if len(argv) != 3:
        print("usage: micropython [-X heapsize=N] board.py FLASH_DIR SIM_DIR")
        sys.exit(2)
    install(argv[2])
    mount_flash(argv[1])
    import main  # noqa: F401  (the board's /main.py: runs the node)


if __name__ == "__main__":
    main(sys.argv)
