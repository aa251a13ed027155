"""`raydock down` stops only the `raydock up` its pid file names: a pid file left by a crash
(kill -9, power loss) whose pid now belongs to another process must not get that process
killed."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from raydock import cli


def _down(home) -> None:
    assert cli.main(["down", "--home", str(home)]) == 0


@pytest.fixture
def other_process():
    """A live process that is not raydock (as a reused pid would be)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # reaped as soon as it exits, as a shell would: a zombie still answers `kill -0`
    threading.Thread(target=proc.wait, daemon=True).start()
    yield proc
    proc.kill()
    proc.wait()


def test_a_stale_pid_file_naming_another_process_leaves_it_running(tmp_path, other_process, capsys):
    # what `raydock up` wrote before it was killed: its pid (reused since) and its start time
    started = int(cli._started_at(other_process.pid)) - 1
    (tmp_path / "raydock.pid").write_text(f"{other_process.pid} {started}")
    _down(tmp_path)
    assert "stale pid file removed" in capsys.readouterr().out
    assert other_process.poll() is None  # not signalled
    assert not (tmp_path / "raydock.pid").exists()


def test_down_stops_the_process_its_pid_file_names(tmp_path, other_process, capsys):
    # written as `raydock up` writes it, for this process: down signals it and waits
    pid = other_process.pid
    (tmp_path / "raydock.pid").write_text(f"{pid} {cli._started_at(pid)}")
    _down(tmp_path)
    assert "raydock stopped" in capsys.readouterr().out
    assert other_process.wait(timeout=5) == -15  # SIGTERM'd


def test_a_pid_file_of_a_process_that_is_gone_is_removed(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "raydock.pid").write_text(str(gone.pid))
    _down(tmp_path)
    assert "stale pid file removed" in capsys.readouterr().out
