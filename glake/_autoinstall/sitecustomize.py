"""Put on PYTHONPATH by `glake run`: installs glake into torch (and CuPy) when they are imported."""

import os

if os.environ.get("GLAKE_AUTO_INSTALL") == "1":
    from glake._import_hook import watch_imports

    watch_imports()
