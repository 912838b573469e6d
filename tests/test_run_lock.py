"""One writer per run directory (sparsetrain.runs.RunDir.lock): a second process fails at once, naming the holder;
a killed holder (SIGKILL) leaves no lock behind."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sparsetrain.runs import RunDir, RunDirectoryError, RunLock, RunLockedError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX flock semantics (SIGKILL) are tested here")

# A process that takes the lock, says so on stdout, and holds it until killed.
HOLD = textwrap.dedent("""
    import sys, time
    from sparsetrain.runs import RunDir
    lock = RunDir(sys.argv[1]).lock()
    print("locked", flush=True)
    time.sleep(600)
""")
# A process that tries to take the lock and reports what happened in its exit status and stderr.
TRY = textwrap.dedent("""
    import sys
    from sparsetrain.runs import RunDir, RunLockedError
    try:
        RunDir(sys.argv[1]).lock()
    except RunLockedError as e:
        sys.exit(f"locked: {e}")
    print("acquired")
""")


@pytest.fixture
def holder(tmp_path):
    """A subprocess holding the lock of ``tmp_path / "run"``; killed (SIGKILL) at teardown if still alive."""
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def _try_in_subprocess(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY, str(path)], capture_output=True, text=True, timeout=60)


def test_lock_creates_the_folder_and_only_the_lock_file(tmp_path):
    run = RunDir(tmp_path / "a" / "b")
    with run.lock() as lock:
        assert isinstance(lock, RunLock) and lock.held
        assert [p.name for p in run.path.iterdir()] == [RunDir.LOCK]
        details = json.loads(run.lock_path.read_text())
        assert details["pid"] == os.getpid() and details["host"] and details["started"] and details["command"]
        assert details == lock.holder
    assert not lock.held
    assert run.lock_path.exists() and run.lock_path.read_text() == ""  # the file stays (deleting it would race)


def test_a_second_lock_in_the_same_process_conflicts_release_then_relock(tmp_path):
    run = RunDir(tmp_path)
    lock = run.lock()
    with pytest.raises(RunLockedError, match=f"{tmp_path} is in use by this process \\(pid {os.getpid()} on host"):
        RunDir(tmp_path).lock()
    lock.release()
    lock.release()  # idempotent
    again = run.lock()
    assert again.held
    again.release()


def test_a_second_process_fails_at_once_and_names_the_holder(tmp_path, holder):
    path = tmp_path / "run"
    proc = holder(path)
    with pytest.raises(RunLockedError) as info:
        RunDir(path).lock()
    e = info.value
    assert isinstance(e, RunDirectoryError)  # the CLI reports it as a user error (exit status 2)
    assert e.path == path and e.holder["pid"] == proc.pid
    message = str(e)
    assert message.startswith(f"{path} is in use by another sparsetrain run (pid {proc.pid} on host ")
    assert f"started {e.holder['started']}: python -c " in message
    assert message.endswith("; wait for it to finish or choose another --out")

    other = _try_in_subprocess(path)  # another process, not only another thread of this one
    assert other.returncode == 1 and other.stdout == ""
    assert f"locked: {path} is in use by another sparsetrain run (pid {proc.pid} on host" in other.stderr


def test_a_killed_holder_leaves_no_lock(tmp_path, holder):
    path = tmp_path / "run"
    proc = holder(path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads(RunDir(path).lock_path.read_text())["pid"] == proc.pid  # its details stay behind ...
    other = _try_in_subprocess(path)  # ... but not its lock
    assert other.returncode == 0, other.stderr
    with RunDir(path).lock() as lock:
        assert json.loads(RunDir(path).lock_path.read_text()) == lock.holder


def test_the_lock_file_is_not_a_run_file(tmp_path):
    RunDir(tmp_path / "locked-only").lock().release()
    run = RunDir(tmp_path / "done")
    with run.lock():
        run.write_config({"model": "lenet5", "dataset": "mnist"})
        run.append_metrics({"epoch": 0, "test_acc": 0.5})
        assert [r.path.name for r in RunDir.find(tmp_path)] == ["done"]
        run.check()
    assert not RunDir(tmp_path / "locked-only").is_run()
    with pytest.raises(RunDirectoryError, match="not a sparsetrain run directory: missing"):
        RunDir(tmp_path / "locked-only").check()
    assert run.derive_summary()["epochs"] == 1


def test_a_file_in_the_way_is_an_error(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(FileExistsError):
        RunDir(tmp_path / "f").lock()


def test_a_file_system_without_locks_is_not_reported_as_a_holder(tmp_path, monkeypatch):
    import errno
    import fcntl

    real_flock = fcntl.flock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OSError, match="No locks available") as info:
        RunDir(tmp_path).lock()
    assert not isinstance(info.value, RunLockedError)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    RunDir(tmp_path).lock().release()


def test_a_run_still_training_is_in_use_not_finished(tmp_path):
    """A second `train --out` on a directory whose run has checkpointed but still holds the lock is told the
    directory is in use (by whom), not that it "already holds a run" to --resume: resuming it would fail too."""
    run = RunDir(tmp_path / "run")
    with run.lock():
        run.checkpoint_path.write_bytes(b"")  # the first epoch's checkpoint of the run holding the lock
        proc = subprocess.run([sys.executable, "-m", "sparsetrain", "train", "--out", str(run.path), "--quiet"],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "in use by" in proc.stderr and "already holds a run" not in proc.stderr
    # once the lock is free, the finished-run message is the right one
    proc = subprocess.run([sys.executable, "-m", "sparsetrain", "train", "--out", str(run.path), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr, proc.stderr
