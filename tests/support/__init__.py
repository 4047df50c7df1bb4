"""What tests and scripts share: a real server process, free ports, test photos, HTTP helpers.

Scripts may import from here; tests never import from `scripts/` nor from another test module.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
