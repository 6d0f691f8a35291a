"""The README's test command installs everything the suite needs: no test may skip for a missing package.

Tests elsewhere still guard optional packages with importorskip (glake itself runs without them);
this test fails when one of the ``test`` extra is missing, so such a skip cannot pass unnoticed.
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import PackageNotFoundError, requires, version

IMPORT_NAME = {"grpcio": "grpc", "grpcio-tools": "grpc_tools", "protobuf": "google.protobuf",
               "prometheus-client": "prometheus_client"}


def extra_names() -> list:
    out = []
    for req in requires("glake") or []:
        if re.search(r"""extra\s*==\s*["']test["']""", req):
            out.append(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))
    return out


def test_every_test_extra_is_installed_and_imports():
    names = extra_names()
    assert {"pytest", "torch", "ninja", "grpcio-tools", "matplotlib"} <= set(names), names
    missing = []
    for name in names:
        try:
            version(name)
            importlib.import_module(IMPORT_NAME.get(name, name.replace("-", "_")))
        except (PackageNotFoundError, ImportError) as e:
            missing.append(f"{name} ({e})")
    assert not missing, f"not installed: {', '.join(missing)}: run pip install -e '.[test]' (see README)"
