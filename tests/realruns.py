"""Where the optional corpus of real third-party runs lies (logs and checkpoints from public
repositories, not part of this repository): the folder named by $TRAINAUDIT_REAL_RUNS, else a
`shared/real-runs` folder beside the checkout. Tests that read it skip when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

REAL_RUNS = Path(os.environ.get("TRAINAUDIT_REAL_RUNS")
                 or Path(__file__).resolve().parents[1].parent / "shared" / "real-runs")
