"""Outputs are never lost and have one owner: validation before any write, staging + commit,
the ``_LOCK`` of a directory (local and gs://), recovery of interrupted commits and stale locks.
Real pipeline runs (transformers engine, tiny models, FnApiRunner), real files, a GCS emulator."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import staging as S
from beam_pipelines.pipeline import main as generate
from rso import ownership, storage
from rso.layout import SUCCESS, is_complete

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [{"prompt_id": f"p{i}", "prompt": f"Question number {i}?"} for i in range(4)]
SMALL = ["--engine", "transformers", "--num-candidates", "4", "--num-samples", "2",
         "--max-new-tokens", "6", "--seed", "3"]


def _args(inputs, out, policy, rm, *extra):
    return ["--input", inputs, "--output", out, "--policy", policy, "--reward-model", rm,
            *SMALL, *extra]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory, prompts_file, tiny_policy, tiny_reward_model) -> str:
    out = str(tmp_path_factory.mktemp("first") / "out")
    assert generate(_args(prompts_file, out, tiny_policy, tiny_reward_model)) == 0
    return out


def _snapshot(directory: str) -> dict[str, bytes]:
    snap = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                snap[os.path.relpath(path, directory)] = f.read()
    return snap


def _manifest(out: str) -> dict:
    with storage.open_file(storage.join(out, "manifest.json"), "r") as f:
        return json.load(f)


def test_a_complete_run_leaves_no_lock_and_no_staging(complete_run):
    names = sorted(os.listdir(complete_run))
    assert SUCCESS in names and "manifest.json" in names
    assert not [n for n in names if n.startswith("_") and n != SUCCESS], names
    assert _manifest(complete_run)["config"]["output"] == complete_run


def test_a_failed_overwrite_keeps_the_previous_run(complete_run, tmp_path, prompts_file,
                                                    tiny_policy, tiny_reward_model, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(complete_run, out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("a user's file")
    before = _snapshot(out)

    # A mistyped --input glob: refused before anything is touched.
    assert generate(_args(str(tmp_path / "prompt*.jsonl"), out, tiny_policy, tiny_reward_model,
                          "--overwrite")) == 2
    assert "matches no file" in capsys.readouterr().err
    assert _snapshot(out) == before

    # Weights that pass the start-up checks but fail to load: the pipeline itself fails.
    broken = str(tmp_path / "broken_policy")
    shutil.copytree(tiny_policy, broken)
    with open(os.path.join(broken, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(Exception):
        generate(_args(prompts_file, out, broken, tiny_reward_model, "--overwrite"))
    assert _snapshot(out) == before  # no staging directory, no lock, the old run as it was

    # A good overwrite replaces the run only once it is complete; the user's file stays.
    old_id = _manifest(out)["run_id"]
    assert generate(_args(prompts_file, out, tiny_policy, tiny_reward_model, "--overwrite",
                          "--seed", "4")) == 0
    manifest = _manifest(out)
    assert manifest["run_id"] != old_id and is_complete(out)
    listed = {n for names in manifest["files"].values() for n in names}
    on_disk = {n for n in os.listdir(out) if n not in ("notes.txt", SUCCESS, "manifest.json")}
    assert on_disk == listed  # nothing of the old run is left beside the new one
    with open(os.path.join(out, "notes.txt")) as f:
        assert f.read() == "a user's file"


def test_a_second_run_into_an_owned_output_fails_and_does_not_mix(
        tmp_path, prompts_file, tiny_policy, tiny_reward_model, capsys):
    out = str(tmp_path / "out")
    first = subprocess.Popen(
        [sys.executable, "-m", "rso_cli.cli", "generate",
         *_args(prompts_file, out, tiny_policy, tiny_reward_model, "--run-id", "first")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    lock = os.path.join(out, ownership.LOCK)
    deadline = time.time() + 300
    while not os.path.exists(lock) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert os.path.exists(lock), first.communicate()[1][-3000:]
    code = generate(_args(prompts_file, out, tiny_policy, tiny_reward_model, "--run-id",
                          "second", "--overwrite"))
    err = capsys.readouterr().err
    assert code == 75
    assert f"is owned by run first (host {socket.gethostname()}, pid {first.pid}," in err
    assert "python -m rso.ownership break" in err
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    manifest = _manifest(out)
    assert manifest["run_id"] == "first" and not os.path.exists(lock)
    assert not [n for n in os.listdir(out) if n.startswith(S.STAGING_PREFIX)]


def _fake_run(directory: str, run_id: str, shards: int) -> None:
    """A complete SPEC 5 directory as the pipeline writes it (manifest lists the files)."""
    names = [f"pairs-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)]
    for name in names:
        with FileSystems.create(FileSystems.join(directory, name)) as f:
            f.write(run_id.encode())
    with FileSystems.create(FileSystems.join(directory, "manifest.json")) as f:
        f.write(json.dumps({"run_id": run_id, "files": {"parquet": names}}).encode())
    with FileSystems.create(FileSystems.join(directory, SUCCESS)) as f:
        f.write(b"")


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return f"{request.getfixturevalue('gcs_bucket')}/{tmp_path.name}"


def test_commit_replaces_the_run_and_an_interrupted_commit_is_finished(root):
    out = f"{root}/out"
    _fake_run(out, "old", shards=3)
    staging = S.staging_dir(out, "tok")
    _fake_run(staging, "new", shards=2)
    S.commit(staging, out)
    assert _manifest(out)["run_id"] == "new" and is_complete(out)
    assert _read(f"{out}/pairs-00001-of-00002.parquet") == b"new"
    assert not FileSystems.exists(f"{out}/pairs-00002-of-00003.parquet")  # old shard gone
    assert S.staging_dirs(out) == []

    # A crash mid-commit: _SUCCESS deleted and one shard moved, the rest still staged.
    staging = S.staging_dir(out, "tok2")
    _fake_run(staging, "newer", shards=2)
    FileSystems.delete([f"{out}/{SUCCESS}"])
    FileSystems.delete([f"{out}/pairs-00000-of-00002.parquet"])
    FileSystems.rename([f"{staging}/pairs-00000-of-00002.parquet"],
                       [f"{out}/pairs-00000-of-00002.parquet"])
    failed = S.staging_dir(out, "failed")
    with FileSystems.create(f"{failed}/pairs-00000-of-00001.parquet") as f:
        f.write(b"partial")  # a run that died before its _SUCCESS
    assert not is_complete(out)
    S.recover(out)
    assert is_complete(out) and _manifest(out)["run_id"] == "newer"
    assert [_read(f"{out}/pairs-0000{i}-of-00002.parquet") for i in range(2)] == [b"newer"] * 2
    assert S.staging_dirs(out) == []

    # A staging directory without _SUCCESS is never committed.
    _fake_run(failed, "x", shards=1)
    FileSystems.delete([f"{failed}/{SUCCESS}"])
    with pytest.raises(RuntimeError, match="not complete"):
        S.commit(failed, out)
    assert _manifest(out)["run_id"] == "newer"


def test_lock_is_exclusive_names_its_owner_and_is_released(root):
    out = f"{root}/owned"
    with ownership.OutputLock.acquire(out, "run-a") as lock:
        assert ownership.read_owner(out) == lock.owner
        with pytest.raises(ownership.OutputLockedError, match="owned by run run-a") as err:
            ownership.OutputLock.acquire(out, "run-b")
        assert err.value.owner.pid == os.getpid()
    assert ownership.read_owner(out) is None
    second = ownership.OutputLock.acquire(out, "run-b")
    ownership.OutputLock(out, ownership.Owner.new("intruder")).release()  # not its lock
    assert ownership.read_owner(out).run_id == "run-b"
    second.release()
    assert not storage.exists(ownership.lock_path(out))


def _lock_of(out: str, pid: int, host: str | None = None) -> None:
    owner = ownership.Owner.new("killed")
    owner = ownership.Owner(**{**owner.__dict__, "pid": pid, "host": host or owner.host})
    storage.makedirs(out)
    with storage.open_file(ownership.lock_path(out), "wb") as f:
        f.write(json.dumps(owner.__dict__).encode())


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = str(tmp_path / "out")
    _lock_of(out, dead.pid)
    with ownership.OutputLock.acquire(out, "next") as lock:
        assert ownership.read_owner(out).token == lock.owner.token
    # On another host nothing can be known: the error says how to recover, and that works.
    _lock_of(out, 1, host="elsewhere")
    with pytest.raises(ownership.OutputLockedError, match="host elsewhere.*if it is no longer "
                                                          "running, delete"):
        ownership.OutputLock.acquire(out, "next")
    assert ownership.main(["break", out]) == 0
    ownership.OutputLock.acquire(out, "next").release()


def test_rso_train_into_an_owned_output_fails(tmp_path, tiny_policy, capsys):
    from tests.pair_data import build_pairs, write_output_dir
    from trainer.train import main as train_main

    data = str(tmp_path / "pairs")
    write_output_dir(data, build_pairs(tiny_policy, num_prompts=2))
    out = str(tmp_path / "train")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock_of(out, holder.pid)
        code = train_main(["--policy", tiny_policy, "--data", data, "--output", out,
                           "--max-steps", "1", "--batch-size", "2", "--no-plots"])
        err = capsys.readouterr().err
        assert code == 2 and "is owned by run killed" in err and f"pid {holder.pid}" in err
        assert os.listdir(out) == [ownership.LOCK]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_an_empty_input_never_replaces_a_complete_run(tiny_policy, tiny_reward_model, tmp_path,
                                                       capsys):
    """An input file with no prompt in it is an error, and --overwrite keeps the old run."""
    import json as json_

    from beam_pipelines.pipeline import main as generate_main

    good = tmp_path / "good.jsonl"
    good.write_text(json_.dumps({"prompt_id": "a", "prompt": "Tell me a joke."}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    out = str(tmp_path / "out")
    args = ["--output", out, "--policy", tiny_policy, "--reward-model", tiny_reward_model,
            "--engine", "transformers", "--num-candidates", "2", "--num-samples", "2",
            "--max-new-tokens", "4"]
    assert generate_main(["--input", str(good), *args]) == 0
    before = sorted(os.listdir(out))
    assert generate_main(["--input", str(empty), "--overwrite", *args]) == 2
    assert "no prompt was read" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before and os.path.exists(os.path.join(out, "_SUCCESS"))
    # Prompts read, but every one a dead letter (here: too long for the context): no record,
    # so the run is refused too, naming the reasons and the first dead letter.
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json_.dumps({"prompt_id": f"l{i}", "prompt": "tell me " * 40})
                            + "\n" for i in range(3)))
    assert generate_main(["--input", str(long), "--overwrite", "--max-model-len", "32",
                          *args]) == 2
    err = capsys.readouterr().err
    assert "no record was written: 3 dead letters" in err and "prompt_too_long" in err
    assert "the first: render/prompt_too_long for l" in err
    assert sorted(os.listdir(out)) == before and os.path.exists(os.path.join(out, "_SUCCESS"))


def test_a_direct_write_after_a_failed_attempt_holds_only_its_own_files(
        tmp_path, prompts_file, tiny_policy, tiny_reward_model):
    """A Flex Template job (wait=False) writes its output directly; when an earlier attempt at
    the same night failed after writing shards (no _SUCCESS), the new run's output must not
    include them: they would be read with it (the trainer refuses unlisted files)."""
    from trainer.data import verify_files

    out = tmp_path / "night"
    out.mkdir()
    stale = ["pairs-00007-of-00009.parquet", "candidates-00001-of-00003.parquet",
             "dead_letter-00000-of-00002.jsonl"]
    for name in stale:
        (out / name).write_bytes(b"from a failed attempt")
    (out / "NOTES.txt").write_text("a user's file")
    # the FnApiRunner runs the job in the launcher's process, so "not waiting" still finishes it
    assert generate(_args(prompts_file, str(out), tiny_policy, tiny_reward_model,
                          "--write-candidates"), wait=False) == 0
    assert is_complete(str(out))
    names = set(os.listdir(out))
    assert not names & set(stale), names & set(stale)
    assert "NOTES.txt" in names  # not a run file: left alone
    listed = _manifest(str(out))["files"]["checksums"]
    assert {n for n in names if n.startswith(("pairs-", "candidates-"))} <= set(listed)
    assert verify_files([str(out)])  # the trainer's check of every record file


def test_an_empty_night_leaves_no_empty_directory_behind(tiny_policy, tiny_reward_model,
                                                         tmp_path, capsys):
    """A run that reads no prompt is refused after the job ran; the output directory it made
    (ROOT/dt=...) goes with it, but a directory that was there before stays."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    root = tmp_path / "root"
    root.mkdir()
    out = root / "dt=2025-01-01"
    assert generate(_args(str(empty), str(out), tiny_policy, tiny_reward_model)) == 2
    assert "no prompt was read" in capsys.readouterr().err
    assert os.listdir(root) == []
    out.mkdir()  # made by someone else: kept, empty as it was
    assert generate(_args(str(empty), str(out), tiny_policy, tiny_reward_model)) == 2
    assert out.is_dir() and os.listdir(out) == []
    # a nested output: the parents the run made go too, down to what was there before
    nested = root / "region=eu" / "dt=2025-01-02" / "pairs"
    assert generate(_args(str(empty), str(nested), tiny_policy, tiny_reward_model)) == 2
    assert sorted(os.listdir(root)) == ["dt=2025-01-01"]


def test_an_output_with_glob_characters_is_refused_at_start(prompts_file, tiny_policy,
                                                            tiny_reward_model, tmp_path, capsys):
    """Beam's file sinks match their own shard paths as globs, so such a directory could
    never be written: one line at start (exit 2), nothing made."""
    for name in ("br[1]", "star*", "what?"):
        out = str(tmp_path / name / "plain")
        assert generate(_args(prompts_file, out, tiny_policy, tiny_reward_model)) == 2
        err = capsys.readouterr().err
        assert "glob pattern" in err and "Traceback" not in err and len(err.splitlines()) == 1
        assert not os.path.exists(tmp_path / name)


def test_a_run_in_a_directory_with_glob_characters_is_read_and_trained_on(
        complete_run, tiny_policy, tmp_path, gcs_bucket):
    """A complete run moved to a directory whose name holds [ ] * ?: its files are found (not
    read as a pattern that matches other directories) and `rso train --data` trains on it."""
    from rso import layout
    from trainer.train import main as train_main

    decoy = tmp_path / "br1" / "plain-x"  # what the unescaped pattern would match
    shutil.copytree(complete_run, decoy)
    os.remove(decoy / "pairs-00000-of-00001.parquet")
    moved = str(tmp_path / "br[1]" / "plain*?")
    shutil.copytree(complete_run, moved)
    assert layout.pair_files(moved) == sorted(
        os.path.join(moved, f) for f in os.listdir(moved) if f.startswith("pairs-")
        and f.endswith(".parquet"))
    assert layout.candidate_files(moved) == []
    out = str(tmp_path / "train")
    assert train_main(["--data", moved, "--policy", tiny_policy, "--output", out,
                       "--max-steps", "1", "--batch-size", "2", "--no-progress",
                       "--no-tensorboard", "--no-plots"]) == 0
    assert os.path.exists(os.path.join(out, "metrics.jsonl"))
    # gs:// (emulator): the same escape through gcsfs
    remote = f"{gcs_bucket}/globs/br[1]"
    fs, path = storage.filesystem(gcs_bucket)
    for name in os.listdir(complete_run):
        if os.path.isfile(os.path.join(complete_run, name)):
            fs.put_file(os.path.join(complete_run, name), f"{path}/globs/br[1]/{name}")
    assert [f.rsplit("/", 1)[-1] for f in layout.pair_files(remote)] == [
        f.rsplit("/", 1)[-1] for f in layout.pair_files(complete_run)]
