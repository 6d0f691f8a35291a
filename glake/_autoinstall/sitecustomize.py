"""Put on PYTHONPATH by `glake run`: installs glake into torch (and CuPy) when they are imported.

If this Python cannot import glake (a venv that is not activated, another interpreter), the
program is not started: `glake run` promised glake's allocator, and running without it silently
would measure the wrong thing.
"""

import os
import sys

if os.environ.get("GLAKE_AUTO_INSTALL") == "1":
    try:
        from glake._import_hook import watch_imports
    except Exception as e:  # noqa: BLE001 - whatever it is, the program must not start without glake
        expected = os.environ.get("GLAKE_RUN_PYTHON", "")
        hint = (f" glake is installed for {expected}: run the program with that Python (activate its venv, or "
                f"`glake run -- {expected} ...`), or install glake into this one." if expected and
                os.path.abspath(expected) != os.path.abspath(sys.executable) else
                " Install glake into this Python (pip install glake) or run the program with one that has it.")
        sys.stderr.write(f"glake run: this Python ({sys.executable}) cannot import glake "
                         f"({type(e).__name__}: {e}); the program was not started.{hint}\n")
        sys.stderr.flush()
        os._exit(1)  # SystemExit here would be a fatal error of the interpreter's start-up, with a traceback
    watch_imports()
