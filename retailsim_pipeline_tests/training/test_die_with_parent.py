"""`die_with_parent`: a training process whose launcher is killed gets exactly one SIGTERM.

The launcher here is a multi-threaded process that starts the child from a worker thread which then
ends, the launcher living on; a second later it is killed with SIGKILL. The child counts the
SIGTERMs it receives: one, not zero (an orphan left training) and not two. ``PR_SET_PDEATHSIG``
fails this: the kernel signals the child when the thread that started it ends (the launcher still
alive) and again each time the child passes to another of the dying launcher's threads; a second
SIGTERM arriving after the trainer has stopped kills it while it ends its MLflow run.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import os, signal, sys, time
from retailsim_pipeline.training.run import die_with_parent
count = []
signal.signal(signal.SIGTERM, lambda *a: count.append(1))
die_with_parent(int(sys.argv[1]), interval=0.05)
print('READY', flush=True)
deadline = time.time() + 60
while not count and time.time() < deadline:
    time.sleep(0.01)
time.sleep(3.0)  # a second signal, if one came, would arrive here
with open(sys.argv[2], 'w') as f:
    f.write(str(len(count)))
"""

LAUNCHER = """
import subprocess, sys, threading, time
procs = []
def spawn():
    procs.append(subprocess.Popen([sys.executable, '-c', sys.argv[1], str(__import__('os').getpid()), sys.argv[2]],
                                  stdout=sys.stdout))
for _ in range(6):
    threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
worker = threading.Thread(target=spawn)  # starts the child, then ends
worker.start()
worker.join()
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc-style process semantics")
def test_a_killed_launcher_sends_its_training_child_exactly_one_sigterm(tmp_path):
    out = tmp_path / "count.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, CHILD, str(out)], stdout=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)
    try:
        assert launcher.stdout.readline().strip() == "READY"
        time.sleep(1.0)  # the thread that started the child has ended; the launcher lives
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.time() + 60
        while not out.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert out.exists(), "the orphaned child never finished"
        assert out.read_text() == "1"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_a_live_launcher_sends_nothing(tmp_path):
    """The watcher does not fire while the launcher lives (here: this test process, not the parent)."""
    code = ("import signal, sys, time\n"
            "from retailsim_pipeline.training.run import die_with_parent\n"
            "got = []\n"
            "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
            "die_with_parent(int(sys.argv[1]), interval=0.05)\n"
            "time.sleep(1.0)\n"
            "print(len(got))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
