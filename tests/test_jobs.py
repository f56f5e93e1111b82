"""The job table's guarantees under real concurrent processes sharing one SQLite file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import jobs
from shared.db import immediate, open_database

REPO_DIR = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# One script, several roles; each role writes what it did as JSON into the work folder.
WORKER = r"""
import json, random, sys, time
from pathlib import Path
from shared import jobs
from shared.db import connect, immediate

role, db_path, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
args = sys.argv[4:]
connection = connect(db_path, busy_timeout_s=30.0)
owner = jobs.worker_name(jobs.DETECT)


def wait_for(path, deadline_s=60.0):
    give_up_at = time.monotonic() + deadline_s
    while not path.exists():
        if time.monotonic() > give_up_at:
            sys.exit(f"{role}: timed out waiting for {path.name}")
        time.sleep(0.005)


def effect(job, tag, then=None):
    def write(conn):
        conn.execute("INSERT INTO effects (job_id, owner, tag) VALUES (?, ?, ?)", (job.id, owner, tag))
        if then is not None:
            then()
    return write


def report(name, document):
    path = work / name
    path.with_suffix(".tmp").write_text(json.dumps(document))
    path.with_suffix(".tmp").rename(path)


def claim_one(lease_s, deadline_s=30.0):
    give_up_at = time.monotonic() + deadline_s
    while True:
        claimed = jobs.claim(connection, jobs.DETECT, owner, lease_s=lease_s)
        if claimed:
            return claimed[0], time.time()
        if time.monotonic() > give_up_at:
            sys.exit(f"{role}: nothing to claim")
        time.sleep(0.02)


def hang():
    (work / "holding").touch()
    time.sleep(3600)


if role == "drain":
    index, workers = int(args[0]), int(args[1])
    (work / f"ready-{index}").touch()
    wait_for(work / "go")
    claimed_ids, lost_ids = [], []
    while True:
        claimed = jobs.claim(connection, jobs.DETECT, owner, lease_s=60.0, limit=random.randint(1, 3))
        if not claimed:
            break
        claimed_ids.extend(job.id for job in claimed)
        if not (work / f"first-{index}").exists():
            # Hold back until every worker has claimed once, so all of them really compete.
            (work / f"first-{index}").touch()
            for other in range(workers):
                wait_for(work / f"first-{other}")
        for job in claimed:
            try:
                jobs.complete(connection, job, effect(job, "drain"))
            except jobs.LeaseLost:
                lost_ids.append(job.id)
    report(f"drain-{index}.json", {"owner": owner, "claimed": claimed_ids, "lost": lost_ids})

elif role == "hold":
    lease_s, when = float(args[0]), args[1]
    job, _ = claim_one(lease_s)
    report("held.json", {"job_id": job.id, "owner": owner, "lease_expires_at": job.lease_expires_at})
    if when == "mid_write":
        jobs.complete(connection, job, effect(job, "killed", then=hang))
    else:
        hang()

elif role == "reclaim":
    job, claimed_at = claim_one(lease_s=60.0)
    jobs.complete(connection, job, effect(job, "reclaimed"))
    report("reclaimed.json", {"job_id": job.id, "owner": owner, "attempts": job.attempts,
                              "claimed_at": claimed_at})

elif role == "stale":
    job, _ = claim_one(float(args[0]))
    report("held.json", {"job_id": job.id, "owner": owner, "lease_expires_at": job.lease_expires_at})
    wait_for(work / "go")
    try:
        jobs.complete(connection, job, effect(job, "stale"))
        outcome = {"outcome": "completed"}
    except jobs.LeaseLost as error:
        outcome = {"outcome": "lease_lost", "message": str(error)}
    report("stale.json", outcome)

elif role == "long_writer":
    with immediate(connection):
        snapshot_id = connection.execute(
            "INSERT INTO snapshots (device_id, camera_id, captured_at, path, bytes, width, height) "
            "VALUES ('d', 'cam0', 1, 'snapshots/late.jpg', 1, 1, 1)"
        ).lastrowid
        jobs.enqueue(connection, jobs.DETECT, snapshot_id)
        (work / "locked").touch()
        wait_for(work / "claiming")
        time.sleep(1.0)
        before_commit = time.time()
    report("writer.json", {"snapshot_id": snapshot_id, "before_commit": before_commit})

elif role == "claimer":
    wait_for(work / "locked")
    (work / "claiming").touch()
    try:
        claimed = jobs.claim(connection, jobs.DETECT, owner, lease_s=60.0)
        outcome = {"snapshot_ids": [job.snapshot_id for job in claimed], "returned_at": time.time()}
    except Exception as error:
        outcome = {"error": f"{type(error).__name__}: {error}"}
    report("claimer.json", outcome)
"""


def start(role: str, db_path: Path, work: Path, *args: object) -> subprocess.Popen:
    """Start one worker process in a role."""
    command = [PYTHON, "-c", WORKER, role, str(db_path), str(work), *map(str, args)]
    return subprocess.Popen(command, cwd=REPO_DIR, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Wait for a worker and fail with its stderr unless it exited 0."""
    _, stderr = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, stderr


def wait_for(path: Path, process: subprocess.Popen | None = None, deadline_s: float = 60.0) -> None:
    """Wait for a worker's marker file, failing early if the worker died."""
    give_up_at = time.monotonic() + deadline_s
    while not path.exists():
        if process is not None and process.poll() is not None:
            pytest.fail(f"worker exited {process.returncode} before {path.name}: {process.stderr.read()}")
        assert time.monotonic() < give_up_at, f"timed out waiting for {path.name}"
        time.sleep(0.01)


def read_json(path: Path) -> dict:
    """A worker's report."""
    return json.loads(path.read_text())


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The folder where workers leave markers and reports."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A migrated database with an `effects` table that has no unique key, so duplicates would show."""
    path = tmp_path / "parkmon.db"
    connection = open_database(path)
    connection.execute("CREATE TABLE effects (id INTEGER PRIMARY KEY, job_id INTEGER, owner TEXT, tag TEXT)")
    connection.close()
    return path


def add_detect_jobs(db_path: Path, count: int) -> list[int]:
    """Snapshots with one DETECT job each; returns the job ids."""
    connection = open_database(db_path)
    with immediate(connection):
        for n in range(count):
            snapshot_id = connection.execute(
                """INSERT INTO snapshots (device_id, camera_id, captured_at, path, bytes, width, height)
                   VALUES ('d', 'cam0', ?, ?, 1, 1, 1)""",
                (1000.0 + n, f"snapshots/{n}.jpg"),
            ).lastrowid
            jobs.enqueue(connection, jobs.DETECT, snapshot_id, now=time.time() - 10)
    job_ids = [row[0] for row in connection.execute("SELECT id FROM jobs ORDER BY id")]
    connection.close()
    return job_ids


def table(db_path: Path, sql: str) -> list[tuple]:
    """Rows of a query as plain tuples."""
    connection = open_database(db_path)
    rows = [tuple(row) for row in connection.execute(sql)]
    connection.close()
    return rows


def test_claim_is_exclusive_across_processes(db_path, work):
    job_ids = add_detect_jobs(db_path, 200)
    workers = [start("drain", db_path, work, index, 3) for index in range(3)]
    for index, worker in enumerate(workers):
        wait_for(work / f"ready-{index}", worker)

    (work / "go").touch()
    for worker in workers:
        finish(worker)

    reports = [read_json(work / f"drain-{index}.json") for index in range(3)]
    claimed = [report["claimed"] for report in reports]
    assert all(claimed), "every worker claimed at least one job"
    assert [report["lost"] for report in reports] == [[], [], []]
    assert sorted(job for batch in claimed for job in batch) == job_ids
    for first in range(3):
        for second in range(first + 1, 3):
            assert set(claimed[first]).isdisjoint(claimed[second])
    assert table(db_path, "SELECT count(*), count(DISTINCT job_id) FROM effects") == [(200, 200)]
    assert table(db_path, "SELECT state, count(*) FROM jobs GROUP BY state") == [("done", 200)]


@pytest.mark.parametrize("when", ["idle", "mid_write"])
def test_killed_worker_job_is_reclaimed_after_its_lease_expires(db_path, work, when):
    [job_id] = add_detect_jobs(db_path, 1)
    holder = start("hold", db_path, work, 1.0, when)
    wait_for(work / "holding", holder)
    held = read_json(work / "held.json")

    reclaimer = start("reclaim", db_path, work)
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=10)
    finish(reclaimer)

    reclaimed = read_json(work / "reclaimed.json")
    assert holder.returncode == -signal.SIGKILL
    assert reclaimed["job_id"] == job_id
    assert reclaimed["attempts"] == 2
    assert reclaimed["claimed_at"] > held["lease_expires_at"]
    effects = table(db_path, "SELECT job_id, owner, tag FROM effects")
    assert effects == [(job_id, reclaimed["owner"], "reclaimed")]
    assert table(db_path, "SELECT state, attempts, lease_owner FROM jobs") == [("done", 2, None)]


@pytest.mark.parametrize("reclaimer_finished", [False, True])
def test_stale_lease_holder_gets_lease_lost_and_its_write_is_rolled_back(db_path, work, reclaimer_finished):
    [job_id] = add_detect_jobs(db_path, 1)
    stale = start("stale", db_path, work, 0.3)
    wait_for(work / "held.json", stale)
    held = read_json(work / "held.json")

    connection = open_database(db_path)
    owner = f"{jobs.worker_name(jobs.DETECT)}-test"
    reclaimed: list[jobs.Job] = []
    while not reclaimed:
        time.sleep(0.05)
        reclaimed = jobs.claim(connection, jobs.DETECT, owner, lease_s=60.0)

    def record(conn):
        conn.execute("INSERT INTO effects (job_id, owner, tag) VALUES (?, ?, 'reclaimed')", (job_id, owner))

    if reclaimer_finished:
        jobs.complete(connection, reclaimed[0], record)
    (work / "go").touch()
    finish(stale)
    if not reclaimer_finished:
        assert table(db_path, "SELECT state, lease_owner, attempts FROM jobs") == [("leased", owner, 2)]
        jobs.complete(connection, reclaimed[0], record)
    connection.close()

    outcome = read_json(work / "stale.json")
    assert outcome["outcome"] == "lease_lost"
    assert held["owner"] in outcome["message"]
    assert table(db_path, "SELECT job_id, owner, tag FROM effects") == [(job_id, owner, "reclaimed")]
    assert table(db_path, "SELECT state, attempts FROM jobs") == [("done", 2)]


def test_claim_waits_for_a_long_write_transaction_instead_of_failing(db_path, work):
    writer = start("long_writer", db_path, work)
    claimer = start("claimer", db_path, work)
    finish(writer)
    finish(claimer)

    written = read_json(work / "writer.json")
    claimed = read_json(work / "claimer.json")
    assert "error" not in claimed, claimed.get("error")
    assert claimed["snapshot_ids"] == [written["snapshot_id"]]
    assert claimed["returned_at"] > written["before_commit"]
