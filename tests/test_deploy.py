"""deploy/: the submission scripts, the offline Dataflow job graph, the nightly refresh.

Real parts throughout: Beam's portable job service (the path Flink jobs take) running the real
pipeline through ``deploy/flink/run.sh`` and ``deploy/nightly/refresh.sh``; the DataflowRunner
building and staging a real job (to the GCS emulator) without submitting it; the LATEST pointer
logic on local disk and on the emulator.
"""
from __future__ import annotations

import ast
import fcntl
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
import time

import pyarrow.parquet as pq
import pytest

from deploy.dataflow import fetch_models
from deploy.nightly import publish as P
from rso import storage as rso_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLINK_RUN = os.path.join(REPO, "deploy", "flink", "run.sh")
DATAFLOW_RUN = os.path.join(REPO, "deploy", "dataflow", "run.sh")
REFRESH = os.path.join(REPO, "deploy", "nightly", "refresh.sh")
PROMPTS = [
    {"prompt_id": "bread", "prompt": "How do I bake bread?"},
    {"prompt_id": "paris", "prompt": "What is the capital of France?"},
    {"prompt_id": "joke", "messages": [{"role": "user", "content": "Tell me a joke."}]},
]
SMALL_RUN = ["--engine", "transformers", "--num-candidates", "4", "--num-samples", "2",
             "--max-new-tokens", "8", "--seed", "3"]
IMAGE = "us-docker.pkg.dev/rso-offline/rso/rso-worker:test"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO)
    env.update(extra)
    return env


def _complete_run(root: str, name: str) -> str:
    """A run directory as the pipeline leaves it (records, then _SUCCESS last)."""
    path = rso_io.join(root, name)
    rso_io.makedirs(path)
    with rso_io.open_file(rso_io.join(path, "pairs-00000-of-00001.parquet"), "wb") as f:
        f.write(b"records")
    with rso_io.open_file(rso_io.join(path, P.SUCCESS), "wb") as f:
        f.write(b"")
    return path


def _partial_run(root: str, name: str) -> str:
    path = rso_io.join(root, name)
    rso_io.makedirs(path)
    with rso_io.open_file(rso_io.join(path, "pairs-00000-of-00001.parquet"), "wb") as f:
        f.write(b"half")
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


# ------------------------------------------------------------------ portable runner (Flink path)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job_service(tmp_path_factory):
    """Beam's local portable job service (``local_job_service_main``): the job API a Flink job
    server also speaks. Yields (endpoint, log path); stopped after the module."""
    log_path = str(tmp_path_factory.mktemp("job_service") / "job_service.log")
    for _ in range(3):  # the port could be taken between choosing and binding it
        port = _free_port()
        log = open(log_path, "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=_env())
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            with open(log_path) as f:
                if "Listening for beam jobs" in f.read():
                    break
            time.sleep(0.2)
        if proc.poll() is None:
            break
        log.close()
    else:
        pytest.fail(f"the job service did not start: {open(log_path).read()[-2000:]}")
    try:
        yield f"localhost:{port}", log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def nightly_portable_run(tmp_path_factory, job_service, prompts_file, tiny_policy,
                         tiny_reward_model):
    """refresh.sh -> flink/run.sh -> PortableRunner (job service, LOOPBACK) -> the real
    pipeline on the tiny models; an older complete night and a stale failed one already exist."""
    endpoint, log_path = job_service
    root = str(tmp_path_factory.mktemp("nightly"))
    old = _complete_run(root, "2025-01-01")
    P.publish(root, "2025-01-01")
    _partial_run(root, "2025-01-02")  # a failed night
    _complete_run(root, "2025-01-03")
    proc = subprocess.run(
        [REFRESH, *SMALL_RUN],
        env=_env(OUTPUT_ROOT=root, RUN_DATE="2025-01-05", KEEP="2", REUSE="0",
                 RUNNER_SCRIPT=FLINK_RUN,
                 LOCK_FILE=os.path.join(root, ".lock"), JOB_ENDPOINT=endpoint,
                 ENVIRONMENT_TYPE="LOOPBACK", INPUT=prompts_file, POLICY=tiny_policy,
                 REWARD_MODEL=tiny_reward_model),
        capture_output=True, text=True, timeout=600)
    return {"proc": proc, "root": root, "run": os.path.join(root, "dt=2025-01-05"), "old": old,
            "job_service_log": log_path}


@pytest.mark.slow
def test_pipeline_runs_on_the_portable_job_service_through_the_flink_script(
        nightly_portable_run):
    proc, run = nightly_portable_run["proc"], nightly_portable_run["run"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(nightly_portable_run["job_service_log"]) as f:
        service_log = f.read()
    # The job went through the job service (not an in-process DirectRunner) and finished.
    assert re.search(r"Running job 'job-", service_log), service_log[-2000:]
    assert "with state DONE" in service_log
    assert os.path.exists(os.path.join(run, "_SUCCESS"))
    table = pq.read_table([os.path.join(run, f) for f in sorted(os.listdir(run))
                           if f.startswith("pairs-") and f.endswith(".parquet")])
    # k=2 kept per prompt, first-round pairing: one pair per prompt unless a tie was dropped.
    assert 1 <= table.num_rows <= len(PROMPTS)
    assert set(table.column("prompt_id").to_pylist()) <= {p["prompt_id"] for p in PROMPTS}
    with open(os.path.join(run, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["counters"]["prompts"] == len(PROMPTS)
    assert manifest["counters"]["records_written"] == table.num_rows
    assert manifest["counters"]["candidates_generated"] == 4 * len(PROMPTS)


@pytest.mark.slow
def test_refresh_publishes_the_new_night_and_keeps_the_newest(nightly_portable_run):
    proc, root, run = (nightly_portable_run[k] for k in ("proc", "root", "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert P.read_latest(root) == run
    assert P.latest_complete(root) == run
    # KEEP=2: the two newest complete nights stay; the older one and the stale failure go
    # (older bare-date nights are ordered with the dt= partitions by their date).
    assert P.list_runs(root) == ["2025-01-03", "dt=2025-01-05"]
    assert f"pruned {nightly_portable_run['old']}" in proc.stdout


@pytest.mark.slow
def test_refresh_rerun_on_a_complete_night_skips_the_pipeline(nightly_portable_run):
    root, run = nightly_portable_run["root"], nightly_portable_run["run"]
    before = os.stat(os.path.join(run, "_SUCCESS")).st_mtime_ns
    proc = subprocess.run([REFRESH], env=_env(
        OUTPUT_ROOT=root, RUN_DATE="2025-01-05", RUNNER_SCRIPT="/bin/false",
        LOCK_FILE=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stdout
    assert os.stat(os.path.join(run, "_SUCCESS")).st_mtime_ns == before
    assert P.read_latest(root) == run


@pytest.fixture(scope="module")
def nightly_reuse_runs(tmp_path_factory, job_service, tiny_policy, tiny_reward_model):
    """Two nights through refresh.sh -> flink/run.sh -> the portable job service, with reuse on
    (the default): night 2's prompt file is night 1's plus one new prompt."""
    endpoint, _ = job_service
    base = tmp_path_factory.mktemp("reuse-nights")
    root = str(base / "root")
    procs = {}
    for date, prompts in (("2025-06-01", PROMPTS[:2]), ("2025-06-02", PROMPTS)):
        path = base / f"{date}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        procs[date] = subprocess.run(
            [REFRESH, *SMALL_RUN],
            env=_env(OUTPUT_ROOT=root, RUN_DATE=date, RUNNER_SCRIPT=FLINK_RUN, LOCK_FILE="",
                     JOB_ENDPOINT=endpoint, ENVIRONMENT_TYPE="LOOPBACK", INPUT=str(path),
                     POLICY=tiny_policy, REWARD_MODEL=tiny_reward_model),
            capture_output=True, text=True, timeout=600)
    return {"root": root, "procs": procs}


def _manifest(run: str) -> dict:
    with open(os.path.join(run, "manifest.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_refresh_writes_dt_partitions_and_the_second_night_decodes_only_new_prompts(
        nightly_reuse_runs):
    root, procs = nightly_reuse_runs["root"], nightly_reuse_runs["procs"]
    for proc in procs.values():
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert P.list_runs(root) == ["dt=2025-06-01", "dt=2025-06-02"]
    night1, night2 = (os.path.join(root, n) for n in P.list_runs(root))
    assert P.latest_complete(root) == night2
    assert _manifest(night1)["accounting"]["decoding"]["prompts_decoded"] == 2
    decoding = _manifest(night2)["accounting"]["decoding"]
    assert (decoding["prompts_decoded"], decoding["prompts_reused"]) == (1, 2)
    assert [p["path"] for p in _manifest(night2)["reuse"]["reused_from"]] == [night1]
    stored = [pq.read_table(os.path.join(n, f)).column("prompt_id").to_pylist()
              for n in (night1, night2) for f in os.listdir(n) if f.startswith("candidates-")]
    per_night = [set(ids) for ids in stored]
    assert sum(len(s) for s in per_night) == len(set().union(*per_night)) == len(PROMPTS)
    pairs = pq.read_table([os.path.join(night2, f) for f in os.listdir(night2)
                           if f.startswith("pairs-") and f.endswith(".parquet")])
    assert set(pairs.column("prompt_id").to_pylist()) <= {p["prompt_id"] for p in PROMPTS}


def test_refresh_refuses_keep_with_reuse_before_running(tmp_path):
    marker = tmp_path / "ran"
    runner = _runner_script(tmp_path, f'touch "{marker}"\n')
    proc = subprocess.run([REFRESH], env=_env(OUTPUT_ROOT=str(tmp_path / "nightly"), KEEP="3",
                                              RUNNER_SCRIPT=runner, LOCK_FILE=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "REUSE=1 is refused" in proc.stderr
    assert "set REUSE=0" in proc.stderr and "check-keep" in proc.stderr  # the way out
    assert not marker.exists()


def test_refresh_refuses_keep_before_running_while_a_night_holds_a_store(tmp_path):
    """REUSE=0 KEEP=1 over nights that hold candidate stores: refused before the pipeline runs
    (publish would refuse afterwards and leave a good run unpublished), with a way out that
    works: the printed rm command, after which the same refresh runs and prunes."""
    marker = tmp_path / "ran"
    runner = _runner_script(tmp_path, f'touch "{marker}"\nmkdir -p "$OUTPUT"\n'
                                      f'touch "$OUTPUT/pairs-00000-of-00001.parquet" '
                                      f'"$OUTPUT/_SUCCESS"\n')
    root = str(tmp_path / "nightly")
    for name in ("dt=2025-08-01", "dt=2025-08-02"):
        with open(os.path.join(_complete_run(root, name), "candidates-00000-of-00001.parquet"),
                  "wb") as f:
            f.write(b"store")
    env = _env(OUTPUT_ROOT=root, RUN_DATE="2025-08-03", REUSE="0", KEEP="1",
               RUNNER_SCRIPT=runner, LOCK_FILE="")
    proc = subprocess.run([REFRESH], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "dt=2025-08-01, dt=2025-08-02" in proc.stderr
    assert not marker.exists() and not os.path.exists(os.path.join(root, "dt=2025-08-03"))
    remove = proc.stderr.split("delete its stores by hand: ", 1)[1].strip()
    subprocess.run(remove, shell=True, check=True)  # the message's command, as a user runs it
    assert P.main(["check-keep", root]) == 0
    proc = subprocess.run([REFRESH], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()
    assert P.read_latest(root) == os.path.join(root, "dt=2025-08-03")
    assert P.list_runs(root) == ["dt=2025-08-03"]  # KEEP=1 pruned the older nights


def test_refresh_passes_reuse_to_the_runner_unless_reuse_is_0(tmp_path):
    runner = _runner_script(tmp_path, 'mkdir -p "$OUTPUT"; echo "$@" > "$OUTPUT/args"\n')
    root = tmp_path / "nightly"
    for reuse, date in (("1", "2025-07-01"), ("0", "2025-07-02")):
        subprocess.run([REFRESH, "--beta", "1"], env=_env(
            OUTPUT_ROOT=str(root), RUN_DATE=date, REUSE=reuse, RUNNER_SCRIPT=runner,
            LOCK_FILE=""), capture_output=True, text=True, timeout=120)
    assert (root / "dt=2025-07-01" / "args").read_text().split() == [
        "--beta", "1", "--reuse-candidates", str(root)]
    assert (root / "dt=2025-07-02" / "args").read_text().split() == ["--beta", "1"]


# ------------------------------------------------------------------ refresh.sh failure paths
def _runner_script(tmp_path, body: str) -> str:
    path = tmp_path / "runner.sh"
    path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)
    return str(path)


def test_refresh_does_not_move_latest_when_the_run_fails(tmp_path):
    root = str(tmp_path / "nightly")
    previous = _complete_run(root, "2025-02-01")
    P.publish(root, "2025-02-01")
    runner = _runner_script(tmp_path, 'mkdir -p "$OUTPUT"; echo partial > "$OUTPUT/x"; exit 3\n')
    proc = subprocess.run([REFRESH], env=_env(OUTPUT_ROOT=root, RUN_DATE="2025-02-02",
                                              RUNNER_SCRIPT=runner, LOCK_FILE=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert P.read_latest(root) == previous


def test_refresh_does_not_move_latest_without_success_marker(tmp_path):
    """The runner exits 0 but the output has no _SUCCESS (e.g. a job cut short)."""
    root = str(tmp_path / "nightly")
    previous = _complete_run(root, "2025-02-01")
    P.publish(root, "2025-02-01")
    runner = _runner_script(
        tmp_path, 'mkdir -p "$OUTPUT"; echo "$JOB_NAME" > "$OUTPUT/pairs-0.parquet"\n')
    proc = subprocess.run([REFRESH], env=_env(OUTPUT_ROOT=root, RUN_DATE="2025-02-02",
                                              RUNNER_SCRIPT=runner, LOCK_FILE=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "no _SUCCESS" in proc.stderr
    assert P.read_latest(root) == previous
    with open(os.path.join(root, "dt=2025-02-02", "pairs-0.parquet")) as f:
        assert f.read().startswith("rso-nightly-2025-02-02-")  # JOB_NAME reached the runner


def test_refresh_refuses_to_overlap_a_running_refresh(tmp_path):
    lock = tmp_path / "refresh.lock"
    marker = tmp_path / "ran"
    runner = _runner_script(tmp_path, f'touch "{marker}"\n')
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run([REFRESH], env=_env(
            OUTPUT_ROOT=str(tmp_path / "nightly"), RUNNER_SCRIPT=runner, LOCK_FILE=str(lock)),
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75
    assert not marker.exists()


def test_refresh_rejects_a_bad_run_date(tmp_path):
    proc = subprocess.run([REFRESH], env=_env(OUTPUT_ROOT=str(tmp_path), RUN_DATE="2025-13-01",
                                              RUNNER_SCRIPT="/bin/true", LOCK_FILE=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "not a date" in proc.stderr
    assert not os.path.exists(os.path.join(str(tmp_path), "2025-13-01"))
    assert not os.path.exists(os.path.join(str(tmp_path), "dt=2025-13-01"))


# ------------------------------------------------------------------ publish.py
def test_latest_only_moves_to_a_complete_run(tmp_path):
    root = str(tmp_path)
    _partial_run(root, "2025-03-01")
    with pytest.raises(P.PublishError, match="no _SUCCESS"):
        P.publish(root, "2025-03-01")
    assert P.read_latest(root) is None
    assert not os.path.exists(os.path.join(root, P.LATEST))
    run = _complete_run(root, "2025-03-02")
    result = P.publish(root, "2025-03-02")
    assert result == P.PublishResult(latest=run, moved=True)
    with open(os.path.join(root, P.LATEST)) as f:
        assert f.read() == run + "\n"
    assert P.publish(root, "2025-03-02").moved is False


def test_latest_does_not_move_back_unless_forced(tmp_path):
    root = str(tmp_path)
    old, new = _complete_run(root, "2025-03-01"), _complete_run(root, "2025-03-02")
    P.publish(root, "2025-03-02")
    assert P.publish(root, "2025-03-01") == P.PublishResult(latest=new, moved=False)
    assert P.read_latest(root) == new
    assert P.publish(root, "2025-03-01", force=True).latest == old
    assert P.read_latest(root) == old


def test_latest_is_replaced_atomically(tmp_path, monkeypatch):
    root = str(tmp_path)
    first = _complete_run(root, "2025-03-01")
    _complete_run(root, "2025-03-02")
    P.publish(root, "2025-03-01")

    def crash(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        P.publish(root, "2025-03-02")
    monkeypatch.undo()
    # The pointer is the old one, whole, and no temporary file is left behind.
    assert P.read_latest(root) == first
    assert sorted(os.listdir(root)) == ["2025-03-01", "2025-03-02", P.LATEST]


def test_retention_keeps_the_newest_complete_runs_and_never_newer_work(tmp_path):
    root = str(tmp_path)
    _complete_run(root, "2025-04-01")
    _partial_run(root, "2025-04-02")      # stale failure, older than what is kept
    _complete_run(root, "2025-04-03")
    _partial_run(root, "2025-04-04")      # failure between kept runs: kept for now
    _complete_run(root, "2025-04-05")
    _partial_run(root, "2025-04-06")      # newer than the published run: maybe running
    os.makedirs(os.path.join(root, "notes"))  # not a run: never touched
    result = P.publish(root, "2025-04-05", keep=2)
    assert sorted(os.path.basename(p) for p in result.pruned) == ["2025-04-01", "2025-04-02"]
    assert P.list_runs(root) == ["2025-04-03", "2025-04-04", "2025-04-05", "2025-04-06"]
    assert os.path.isdir(os.path.join(root, "notes"))
    # The published run survives even when newer complete runs would outnumber it.
    _complete_run(root, "2025-04-07")
    _complete_run(root, "2025-04-08")
    P.prune(root, keep=1, latest="2025-04-05")
    assert "2025-04-05" in P.list_runs(root)
    assert "2025-04-08" in P.list_runs(root)  # newer than LATEST: untouched
    with pytest.raises(P.PublishError):
        P.prune(root, keep=0)


def test_relative_root_publishes_an_absolute_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _complete_run(str(tmp_path / "nightly"), "2025-03-01")
    assert P.main(["publish", "nightly", "2025-03-01"]) == 0
    with open(tmp_path / "nightly" / P.LATEST) as f:
        assert f.read() == run + "\n" and os.path.isabs(run)
    monkeypatch.chdir("/")  # another directory reads the same pointer
    assert P.latest_complete(str(tmp_path / "nightly")) == run
    # A relative pointer left by an older publish still resolves inside ROOT.
    with open(tmp_path / "nightly" / P.LATEST, "w") as f:
        f.write("nightly/2025-03-01\n")
    assert P.read_latest(str(tmp_path / "nightly")) == run


def test_latest_that_is_not_a_date_fails_loudly_until_forced(tmp_path, capsys):
    root = str(tmp_path)
    run = _complete_run(root, "2025-03-02")
    hotfix = _complete_run(root, "hotfix")
    P.write_atomic(os.path.join(root, P.LATEST), hotfix + "\n")
    assert P.main(["publish", root, "2025-03-02"]) == 1
    assert "whose last part is not a date" in capsys.readouterr().err
    assert P.read_latest(root) == hotfix
    assert P.main(["publish", root, "2025-03-02", "--force"]) == 0
    assert P.read_latest(root) == run


def test_dt_partitions_and_older_bare_dates_are_one_sequence(tmp_path):
    root = str(tmp_path)
    old = _complete_run(root, "2025-03-01")  # an older refresh's bare date
    P.publish(root, "2025-03-01")
    assert P.read_latest(root) == old
    new = _complete_run(root, "dt=2025-03-02")
    assert P.publish(root, "2025-03-02").latest == new  # a date means dt=<date>
    assert P.list_runs(root) == ["2025-03-01", "dt=2025-03-02"]
    # a backfilled dt= night older than LATEST does not move it back
    _complete_run(root, "dt=2025-02-28")
    assert P.publish(root, "dt=2025-02-28") == P.PublishResult(latest=new, moved=False)
    assert P.prune(root, keep=1, latest="dt=2025-03-02") == [
        os.path.join(root, "dt=2025-02-28"), old]


def test_retention_is_refused_while_a_night_holds_a_candidate_store(tmp_path, capsys):
    root = str(tmp_path)
    _complete_run(root, "dt=2025-03-01")
    run = _complete_run(root, "dt=2025-03-02")
    with open(os.path.join(run, "candidates-00000-of-00001.parquet"), "wb") as f:
        f.write(b"store")
    _complete_run(root, "dt=2025-03-03")
    assert P.main(["check-keep", root]) == 2  # what refresh.sh asks before running
    assert "dt=2025-03-02" in capsys.readouterr().err
    assert P.main(["publish", root, "dt=2025-03-03", "--keep", "1"]) == 1
    assert "candidate store" in capsys.readouterr().err
    assert P.read_latest(root) is None  # nothing moved, nothing deleted
    assert len(P.list_runs(root)) == 3
    assert P.main(["publish", root, "dt=2025-03-03"]) == 0  # without --keep: published


@pytest.mark.parametrize("name", ["2025-1-01", "latest", "2025-02-30", "../2025-01-01",
                                  "dt=2025-02-30", "dt=latest"])
def test_run_names_must_be_dates(tmp_path, name):
    with pytest.raises(P.PublishError, match="not a date"):
        P.publish(str(tmp_path), name)


def test_publish_on_gcs_emulator(gcs_bucket):
    root = f"{gcs_bucket}/test_deploy/nightly"
    _complete_run(root, "2025-05-01")
    _partial_run(root, "2025-05-02")
    with pytest.raises(P.PublishError):
        P.publish(root, "2025-05-02")
    assert P.read_latest(root) is None
    newest = _complete_run(root, "2025-05-03")
    assert P.main(["publish", root, "2025-05-03", "--keep", "1"]) == 0
    assert P.latest_complete(root) == newest
    assert P.list_runs(root) == ["2025-05-03"]
    assert P.main(["complete", newest]) == 0
    assert P.main(["complete", rso_io.join(root, "2025-05-02")]) == 1


# ------------------------------------------------------------------ Dataflow
def _dataflow_dry_run(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([DATAFLOW_RUN, *env.pop("args", [])],
                          env=_env(DRY_RUN="1", **env), capture_output=True, text=True,
                          timeout=60)


def test_dataflow_script_composes_gpu_options_and_hides_nothing_it_should_not_print():
    proc = _dataflow_dry_run(PROJECT="p", REGION="us-central1", BUCKET="gs://b/rso/",
                             IMAGE=IMAGE, REWARD_MODEL="/models/a,weight=0.7;/models/b",
                             HF_TOKEN="hf_do_not_print", args=["--beta", "0.5"])
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:4] == [sys.executable, "-m", "rso_cli.cli", "generate"]
    joined = " ".join(argv)
    for expected in ["--runner DataflowRunner", "--temp_location gs://b/rso/tmp",
                     "--staging_location gs://b/rso/staging", f"--sdk_container_image {IMAGE}",
                     "--experiments use_runner_v2",
                     "--experiments no_use_multiple_sdk_containers",
                     "--number_of_worker_harness_threads 1", "--machine_type g2-standard-8",
                     "--dataflow_service_options worker_accelerator=type:nvidia-l4;count:1;"
                     "install-nvidia-driver",
                     f"--setup_file {REPO}/setup.py",
                     "--reward-model /models/a,weight=0.7 --reward-model /models/b",
                     "--beta 0.5"]:
        assert expected in joined
    assert "hf_do_not_print" not in proc.stdout + proc.stderr

    cpu = _dataflow_dry_run(PROJECT="p", REGION="r", BUCKET="gs://b", IMAGE=IMAGE,
                            GPU_TYPE="none", SETUP_FILE="")
    assert "worker_accelerator" not in cpu.stdout and "--setup_file" not in cpu.stdout

    missing = _dataflow_dry_run(PROJECT="p", REGION="r", IMAGE=IMAGE)
    assert missing.returncode != 0 and "BUCKET" in missing.stderr


def test_dataflow_job_graph_is_built_and_staged_offline(tmp_path, gcs_bucket, prompts_file,
                                                        tiny_policy, tiny_reward_model):
    """The DataflowRunner with run.sh's options builds, stages (to the GCS emulator) and writes
    the job as a template instead of submitting it; the job's graph has every stage."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.portability.api import beam_runner_api_pb2

    from beam_pipelines.config import GenerateConfig
    from beam_pipelines.pipeline import build_pipeline

    template = str(tmp_path / "template.json")
    output = str(tmp_path / "out")
    proc = _dataflow_dry_run(
        PROJECT="rso-offline", REGION="us-central1", BUCKET=f"{gcs_bucket}/dataflow",
        IMAGE=IMAGE, JOB_NAME="rso-graph-test", INPUT=prompts_file, OUTPUT=output,
        POLICY=tiny_policy, REWARD_MODEL=tiny_reward_model,
        args=[*SMALL_RUN, "--template_location", template,
              "--dataflow_endpoint", "http://localhost:1", "--no_auth"])
    assert proc.returncode == 0, proc.stderr
    config, beam_args = GenerateConfig.parse_args(shlex.split(proc.stdout)[4:],
                                                  allow_unknown=True)
    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(pipeline, config)
    result = pipeline.run()
    assert not result.has_job  # a template was written; nothing was submitted

    with open(template) as f:
        job = json.load(f)
    env = job["environment"]
    options = env["sdkPipelineOptions"]["options"]
    with rso_io.open_file(options["pipelineUrl"], "rb") as f:
        graph = beam_runner_api_pb2.Pipeline.FromString(f.read())
    pool = env["workerPools"][0]
    packages = {p["name"]: p["location"] for p in pool["packages"]}
    workflow = "gs://" + packages["workflow.tar.gz"].split("storage.googleapis.com/", 1)[1]
    sdist = tmp_path / "workflow.tar.gz"
    with rso_io.open_file(workflow, "rb") as src, open(sdist, "wb") as dst:
        dst.write(src.read())

    assert options["pipelineUrl"].startswith(f"{gcs_bucket}/dataflow/staging/rso-graph-test.")
    names = {t.unique_name for t in graph.components.transforms.values()}
    for stage in ["Read/ReadLines", "Read/ParseLines", "Render", "Generate",
                  "Generate/Generate/Infer/BeamML_RunInference", "Reward", "Select/SelectAndPair",
                  "ToRecords", "Write/WriteParquet", "Write/WriteTFRecord",
                  "Write/WriteDeadLetters", "Write/Finish"]:
        assert stage in names, sorted(n for n in names if n.count("/") < 2)
    assert any(n.startswith("Reward/") and n.endswith("BeamML_RunInference") for n in names)
    # Workers run the custom image, one SDK process per VM, one thread, with an L4 each.
    (environment,) = graph.components.environments.values()
    assert environment.urn == "beam:env:docker:v1"
    assert beam_runner_api_pb2.DockerPayload.FromString(
        environment.payload).container_image == IMAGE
    assert env["serviceOptions"] == ["worker_accelerator=type:nvidia-l4;count:1;"
                                     "install-nvidia-driver"]
    assert "use_runner_v2" in env["experiments"]
    assert "use_multiple_sdk_containers" not in env["experiments"]
    assert options["number_of_worker_harness_threads"] == 1
    assert pool["machineType"] == "g2-standard-8"
    # --setup_file staged this checkout as an sdist that the workers pip-install.
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    assert any(m.endswith("beam_pipelines/pipeline.py") for m in members)
    assert not os.path.exists(output)  # building the graph wrote no output


# ------------------------------------------------------------------ Flink script, image, models
def test_flink_script_modes():
    base = dict(INPUT="in.jsonl", OUTPUT="out", POLICY="/models/policy",
                REWARD_MODEL="/models/reward", DRY_RUN="1")
    flink = subprocess.run([FLINK_RUN], env=_env(FLINK_MASTER="flink-jm:8081", IMAGE=IMAGE,
                                                 PARALLELISM="4", **base),
                           capture_output=True, text=True, timeout=60)
    assert flink.returncode == 0, flink.stderr
    joined = " ".join(shlex.split(flink.stdout))
    for expected in ["--runner FlinkRunner", "--flink_master flink-jm:8081",
                     "--environment_type DOCKER", f"--environment_config {IMAGE}",
                     "--sdk_worker_parallelism 1", "--parallelism 4"]:
        assert expected in joined
    external = subprocess.run([FLINK_RUN], env=_env(JOB_ENDPOINT="js:8099",
                                                    ENVIRONMENT_TYPE="EXTERNAL", **base),
                              capture_output=True, text=True, timeout=60)
    joined = " ".join(shlex.split(external.stdout))
    assert "--runner PortableRunner --job_endpoint js:8099" in joined
    assert "--environment_config localhost:50000" in joined
    nowhere = subprocess.run([FLINK_RUN], env=_env(**base), capture_output=True, text=True,
                             timeout=60)
    assert nowhere.returncode == 2 and "FLINK_MASTER" in nowhere.stderr
    bad = subprocess.run([FLINK_RUN], env=_env(JOB_ENDPOINT="js:8099", ENVIRONMENT_TYPE="PROCESS",
                                               **base), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "ENVIRONMENT_TYPE" in bad.stderr


def test_worker_image_uses_the_pinned_beam_version():
    """Dataflow refuses a container whose Beam differs from the launcher's."""
    import apache_beam

    with open(os.path.join(REPO, "setup.py")) as f:  # importing setup.py would run setup()
        (pins,) = [ast.literal_eval(node.value) for node in ast.parse(f.read()).body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PINS"]
    with open(os.path.join(REPO, "deploy", "dataflow", "Dockerfile")) as f:
        dockerfile = f.read()
    (version,) = re.findall(r"^ARG BEAM_VERSION=(\S+)$", dockerfile, re.M)
    assert re.search(r"^FROM apache/beam_python3\.11_sdk:\$\{BEAM_VERSION\}$", dockerfile, re.M)
    assert pins["apache-beam"].endswith("==" + version)
    assert apache_beam.__version__ == version
    assert 'pip install ".[${EXTRA}]"' in dockerfile and "ARG EXTRA=gpu" in dockerfile
    assert re.search(r'^ENTRYPOINT \["/opt/rso/deploy/dataflow/entrypoint.sh"\]$', dockerfile,
                     re.M)
    with open(os.path.join(REPO, "deploy", "dataflow", "entrypoint.sh")) as f:
        assert 'exec /opt/apache/beam/boot "$@"' in f.read()


def test_fetch_models_copies_once_and_redoes_an_interrupted_copy(tmp_path, gcs_bucket,
                                                                 tiny_policy):
    source = f"{gcs_bucket}/test_deploy/models/policy"
    files = sorted(os.listdir(tiny_policy))
    for name in files:
        with open(os.path.join(tiny_policy, name), "rb") as src, \
                rso_io.open_file(f"{source}/{name}", "wb") as dst:
            dst.write(src.read())
    dest = str(tmp_path / "policy")
    assert fetch_models.fetch(source, dest) == len(files)
    assert fetch_models.fetch(source, dest) == 0  # complete: skipped
    os.unlink(os.path.join(dest, fetch_models.MARKER))  # as if cut short
    os.unlink(os.path.join(dest, "config.json"))
    assert fetch_models.fetch(source, dest) == len(files)
    with pytest.raises(FileNotFoundError):
        fetch_models.fetch(f"{gcs_bucket}/test_deploy/models/missing", str(tmp_path / "none"))
    assert sorted(os.listdir(dest)) == sorted(files + [fetch_models.MARKER])
    for name in files:
        with open(os.path.join(dest, name), "rb") as a, \
                open(os.path.join(tiny_policy, name), "rb") as b:
            assert a.read() == b.read()


def test_readme_documents_every_deploy_file_and_the_example_config_loads():
    from beam_pipelines.config import GenerateConfig

    deploy = os.path.join(REPO, "deploy")
    with open(os.path.join(deploy, "README.md")) as f:
        readme = f.read()
    for directory, _, names in os.walk(deploy):
        rel = os.path.relpath(directory, deploy)
        if "__pycache__" in rel or rel.startswith(os.path.join("dataflow", "models")):
            continue
        for name in names:
            if name == "__init__.py" or name == "README.md" or name.endswith(".pyc"):
                continue
            stem = name.split(".")[0] if name.startswith("rso-refresh") else name
            assert stem in readme, f"deploy/{rel}/{name} is not described in deploy/README.md"
    config = GenerateConfig.from_yaml(os.path.join(deploy, "dataflow", "generate.example.yaml"))
    assert config.engine == "vllm" and config.vllm_gpu_memory_utilization == 0.6
    for script in ["dataflow/run.sh", "dataflow/entrypoint.sh", "flink/run.sh",
                   "nightly/refresh.sh", "nightly/cloud_scheduler.sh"]:
        assert os.access(os.path.join(deploy, script), os.X_OK), script


# ------------------------------------------------------------------ Flex Template
FLEX = os.path.join(REPO, "deploy", "dataflow", "flex_template")
SCHEDULER = os.path.join(REPO, "deploy", "nightly", "cloud_scheduler.sh")


def test_flex_template_metadata_is_generated_from_the_config():
    import dataclasses
    import typing

    from beam_pipelines.config import GenerateConfig
    from deploy.dataflow.flex_template import parameters as T

    with open(os.path.join(FLEX, "metadata.json"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == T.render(), "regenerate metadata.json (parameters.py module doc)"
    assert T.main(["--check"]) == 0
    params = {p["name"]: p for p in json.loads(committed)["parameters"]}
    fields = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    assert set(params) == {"config"} | set(fields) - set(T.NOT_EXPOSED)
    hints = typing.get_type_hints(GenerateConfig)
    for name, p in params.items():
        assert {"name", "label", "helpText", "isOptional", "paramType"} <= set(p), name
        if name == "config":
            continue
        inner = typing.get_args(hints[name])[0] if typing.get_origin(hints[name]) in (
            typing.Union, getattr(__import__("types"), "UnionType", None)) else hints[name]
        regexes = p.get("regexes", [])
        default = fields[name].default
        if inner is bool:
            assert regexes == [T.BOOL]
        elif inner in (int, float):
            assert regexes == [T.INT if inner is int else T.FLOAT], name
            if default is not None:
                assert re.match(regexes[0], str(default)), name
            assert not re.match(regexes[0], "1; rm")
        elif typing.get_origin(inner) is typing.Literal:
            for choice in typing.get_args(inner):
                assert re.match(regexes[0], choice)
            assert not re.match(regexes[0], "nonsense")
        else:
            assert not regexes, name
    # the launcher's --name=value arguments become rso generate flags that parse
    import datetime

    flags = T.to_flags(["--output=gs://b/root/dt={run_date}", "--dedup=false",
                        "--reward_model=/m/a,weight=0.5;/m/b", "--num_candidates=4",
                        "--runner=DataflowRunner"], today=datetime.date(2025, 8, 1))
    assert flags == ["--output", "gs://b/root/dt=2025-08-01", "--no-dedup",
                     "--reward-model", "/m/a,weight=0.5", "--reward-model", "/m/b",
                     "--num-candidates", "4", "--runner=DataflowRunner"]


def _dag_literal(name: str):
    with open(os.path.join(REPO, "deploy", "nightly", "airflow_dag.py")) as f:
        (value,) = [ast.literal_eval(node.value) for node in ast.parse(f.read()).body
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name]
    return value


def _scheduler_parameters(tmp_path, **env) -> dict:
    proc = subprocess.run([SCHEDULER], env=_env(DRY_RUN="1", **env), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:5] == ["gcloud", "scheduler", "jobs", "create", "http"]
    assert argv[argv.index("--uri") + 1].endswith("/flexTemplates:launch")
    body = json.loads(argv[argv.index("--message-body") + 1])["launchParameter"]
    assert body["containerSpecGcsPath"] == env["TEMPLATE"]
    assert body["environment"]["sdkContainerImage"] == env["IMAGE"]
    return body["parameters"]


@pytest.mark.parametrize("source", ["airflow_dag", "cloud_scheduler"])
def test_nightly_template_parameters_parse_and_build_the_job_offline(
        tmp_path, gcs_bucket, prompts_file, tiny_policy, tiny_reward_model, source):
    """What the DAG / the scheduler pass to the Flex Template goes through the launcher's
    translation, parses with GenerateConfig and builds the Dataflow job (a template file,
    staged to the GCS emulator, nothing submitted), reuse stage included."""
    import datetime

    import apache_beam as beam
    import yaml
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.portability.api import beam_runner_api_pb2

    from beam_pipelines.config import GenerateConfig
    from beam_pipelines.pipeline import build_pipeline
    from deploy.dataflow.flex_template.parameters import metadata, to_flags

    config = tmp_path / "rso.yaml"
    config.write_text(yaml.safe_dump({
        "input": prompts_file, "policy": tiny_policy, "reward_model": [{"path": tiny_reward_model}],
        "engine": "transformers", "num_candidates": 4, "num_samples": 2, "max_new_tokens": 8}))
    root = str(tmp_path / "nightly")
    if source == "airflow_dag":
        values = {"{{ var.value.rso_config }}": str(config),
                  "{{ var.value.rso_output_root }}": root, "{{ ds }}": "2025-08-01"}
        params = {}
        for key, text in _dag_literal("TEMPLATE_PARAMETERS").items():
            for placeholder, value in values.items():
                text = text.replace(placeholder, value)
            params[key] = text
        assert "sdkContainerImage" in _dag_literal("ENVIRONMENT")
    else:
        params = _scheduler_parameters(
            tmp_path, PROJECT="p", REGION="r", BUCKET="gs://b", IMAGE=IMAGE,
            CONFIG=str(config), OUTPUT_ROOT=root, TEMPLATE="gs://b/templates/rso.json",
            SCHEDULER_SA="s@p.iam.gserviceaccount.com")
    assert set(params) <= {p["name"] for p in metadata()["parameters"]}
    argv = to_flags([f"--{k}={v}" for k, v in params.items()], today=datetime.date(2025, 8, 1))
    cfg, rest = GenerateConfig.parse_args(argv)
    assert rest == []
    assert cfg.output == os.path.join(root, "dt=2025-08-01")
    assert cfg.reuse_candidates == root and cfg.stores_candidates

    template = str(tmp_path / "template.json")
    pipeline = beam.Pipeline(options=PipelineOptions([
        "--runner", "DataflowRunner", "--project", "rso-offline", "--region", "us-central1",
        "--temp_location", f"{gcs_bucket}/flex/tmp", "--staging_location",
        f"{gcs_bucket}/flex/staging", "--sdk_container_image", IMAGE,
        "--sdk_location", "container", "--experiments", "use_runner_v2",
        "--template_location", template, "--dataflow_endpoint", "http://localhost:1",
        "--no_auth"]))
    build_pipeline(pipeline, cfg)
    assert not pipeline.run().has_job
    with open(template) as f:
        options = json.load(f)["environment"]["sdkPipelineOptions"]["options"]
    with rso_io.open_file(options["pipelineUrl"], "rb") as f:
        graph = beam_runner_api_pb2.Pipeline.FromString(f.read())
    names = {t.unique_name for t in graph.components.transforms.values()}
    for stage in ["Read/ReadLines", "Render", "MatchStored", "Generate", "Reward", "Select",
                  "Write/WriteCandidates", "Write/Finish"]:
        assert stage in names, stage
    assert not os.path.exists(cfg.output)
