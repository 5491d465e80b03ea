"""docs/reliability.md counts every case of tests/failures/: the cases collected now are those recorded by
the last `python scripts/reliability_table.py` run, with the same input, stage and expectations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.hostile(counted=False)  # bookkeeping, not a hostile input


def test_recorded_cases_are_the_collected_ones():
    proc = subprocess.run([sys.executable, "scripts/reliability_table.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_tables_match_the_recorded_verdicts():
    """The doc's tables are the generator's output for the recorded cases, not edited by hand."""
    sys.path.insert(0, str(REPO / "scripts"))
    import reliability_table

    recorded = json.loads(reliability_table.CASES.read_text())
    text = reliability_table.DOC.read_text()
    body = text.split(reliability_table.BEGIN)[1].split(reliability_table.END)[0]
    assert body.strip() == reliability_table.tables(recorded["cases"], recorded["when"]).strip()
    assert all(case["verdict"] in reliability_table.VERDICTS for case in recorded["cases"].values())
