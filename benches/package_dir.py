"""Where a bench imports modelkin from: this checkout's python/, or the tree `--modelkin DIR` names
(A/B runs against another build). Importing this puts that directory first on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "python"
for i, arg in enumerate(sys.argv):
    if arg == "--modelkin" and i + 1 < len(sys.argv):
        PACKAGE_DIR = Path(sys.argv[i + 1]).resolve()
    elif arg.startswith("--modelkin="):
        PACKAGE_DIR = Path(arg.split("=", 1)[1]).resolve()
sys.path.insert(0, str(PACKAGE_DIR))
