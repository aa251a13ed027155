"""The data plane (serve_apps) is given what it needs as plain data: importing any of its
modules must not load the control plane (raydock.platform: database, registry, actors)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import importlib, pkgutil, sys
import raydock.serve_apps as plane
for mod in pkgutil.walk_packages(plane.__path__, "raydock.serve_apps."):
    importlib.import_module(mod.name)
print("\\n".join(sorted(m for m in sys.modules if m.startswith("raydock.platform"))))
"""


def test_serve_apps_import_nothing_of_the_control_plane():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    assert out.strip() == "", f"serve_apps loads control-plane modules:\n{out}"
