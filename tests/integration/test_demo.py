"""The README's first command: the demo runs every job to its end on the real broker."""

import os
import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.rabbitmq_only
def test_the_demo_runs_every_job_to_its_outcome(amqp_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        env={**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "not every job finished" not in out, out
    assert "was lost" not in out, out  # the recorder's lock, freed as it stops
    # every job of the sign-up to its outcome, none left pending in the table
    table = out[: out.index("job log (sqlite")]
    assert "pending" not in table, out
    for job in ("crm.create_record", "fulfilment.assign_centre", "emails.send_welcome"):
        assert any(line.startswith(job) and "succeeded" in line for line in table.splitlines()), out
    invoice = [line for line in table.splitlines() if line.startswith("billing.sync_invoice")]
    assert len(invoice) == 1 and invoice[0].rstrip().endswith("dead (exhausted)"), out
    # the periodic job: every 2 s in the demo, each tick once
    ticks = [line for line in table.splitlines() if line.startswith("fulfilment.sync_stock")]
    assert ticks and all("succeeded" in t for t in ticks), out
    assert len({t.split()[2] for t in ticks}) == len(ticks), out  # "tick HH:MM:SS"
    # the job log, written by the recorder from the events: every job with its row
    log = out[out.index("job log (sqlite") :]
    assert log.count("  1042  succeeded") == 4, out
    assert "1042  dead       3" in log and "PermissionError" in log, out
    assert '{"crm_id": "crm-1042"}' in log and '"London"' in log, out
    assert "unknown" not in log, out
    assert "deleted" in out
