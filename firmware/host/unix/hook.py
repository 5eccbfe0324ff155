"""(CPython) The boot code that makes provisioning/simboard.py's unix-port board an ESP32 for this firmware:

    SimBoard(flash, heapsize="200K", boot_code=boot_code(sim_dir)).start()

SimBoard runs `boot_code` after mounting the flash folder at `/`, at every (soft) reset. This mounts this
folder for a moment, puts the fake machine/network/esp32/ntptime in sys.modules (board.install), unmounts
it again, and with `run_main` runs the board's /main.py as a board does after reset (Ctrl-C from mpremote
interrupts it into the REPL, as on a board's UART).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def boot_code(sim_dir: str | Path, *, run_main: bool = True) -> str:
    code = (f"import os, sys\nos.mount(os.VfsPosix({str(HERE)!r}), '/_fakes')\nsys.path.insert(0, '/_fakes')\n"
            f"import board as _board\n_board.install({str(sim_dir)!r})\n"
            "sys.path.remove('/_fakes')\nos.umount('/_fakes')\ndel _board\n")
    if run_main:
        code += "try:\n    import main\nexcept KeyboardInterrupt:\n    pass\n"
    return code
