"""Every dynemb command unwinds on SIGTERM as on Ctrl-C, so what it started (a server, its
stage processes, replicas) is stopped by the code that started it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from dynemb.cli import stop_like_ctrl_c

    stop_like_ctrl_c()
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        with open(sys.argv[1], "w") as f:
            f.write("cleaned up")
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_runs_the_cleanup_of_what_the_command_started(tmp_path, sig):
    marker = tmp_path / "marker"
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # a background process: SIGINT may be inherited as ignored
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(sig)
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert marker.read_text() == "cleaned up"
    assert process.returncode != 0
