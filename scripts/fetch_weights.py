"""Download and convert every model's weights into MODELS_DIR (the image build; `make run`; `make weights`).

    python scripts/fetch_weights.py MODELS_DIR [--mode base|fast] [--checkpoint FILE.pth]
    python scripts/fetch_weights.py MODELS_DIR --cutout-only --if-missing --offline-ok   (what `make run` runs)

The work is `effects.weights` (its docstring says what is fetched from where); this is its command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effects.weights import main

if __name__ == "__main__":
    raise SystemExit(main())
