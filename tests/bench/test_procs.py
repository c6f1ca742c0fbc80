"""Process supervision and /proc readers of the benchmark harness."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from bench.measure import CpuWatch
from bench.procs import HarnessError, ProcessGroup, cpu_seconds, last_json_line, rss_bytes, thread_cpu_ns

pytestmark = pytest.mark.timeout(60)


def test_proc_readers_on_this_process() -> None:
    assert rss_bytes(os.getpid()) > 1024 * 1024
    before = cpu_seconds(os.getpid())
    ns_before = thread_cpu_ns(os.getpid())
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        sum(range(1000))
    assert cpu_seconds(os.getpid()) >= before
    ns_after = thread_cpu_ns(os.getpid())
    assert ns_after[threading.get_native_id()] > ns_before[threading.get_native_id()]


def test_readers_fail_clearly_for_a_gone_process(tmp_path: object) -> None:
    with ProcessGroup() as group:
        proc = group.spawn("quick", [sys.executable, "-c", "pass"])
        proc.popen.wait(10)
    with pytest.raises(HarnessError, match="process"):
        rss_bytes(proc.pid)
    with pytest.raises(HarnessError, match="process"):
        cpu_seconds(proc.pid)


def test_group_kills_everything_it_started_including_grandchildren() -> None:
    child_code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    with ProcessGroup() as group:
        stubborn = group.spawn(
            "stubborn",
            [
                sys.executable,
                "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
            ],
        )
        parent = group.spawn("parent", [sys.executable, "-c", child_code], pipe=True)
        grandchild = int(parent.read_line(20))
        assert stubborn.alive()
        assert parent.alive()
    assert not stubborn.alive()
    assert not parent.alive()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{grandchild}") and time.monotonic() < deadline:
        time.sleep(0.05)
    state = ""
    try:
        with open(f"/proc/{grandchild}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        pass
    assert state in ("", "Z")  # gone, or a zombie waiting for its (dead) parent's reaper


def test_read_line_times_out() -> None:
    with ProcessGroup() as group:
        proc = group.spawn("silent", [sys.executable, "-c", "import time; time.sleep(30)"], pipe=True)
        with pytest.raises(HarnessError, match="no answer"):
            proc.read_line(0.3)


def test_last_json_line() -> None:
    assert last_json_line('noise\n{"a": 1}\nmore noise\n{"ok": true}\n') == {"ok": True}
    with pytest.raises(HarnessError, match="no JSON"):
        last_json_line("nothing here\n[1, 2]\n")


def test_read_line_returns_lines_one_by_one_even_when_they_arrive_together() -> None:
    code = "import sys; sys.stdout.write('one\\ntwo\\nthree\\n'); sys.stdout.flush(); import time; time.sleep(30)"
    with ProcessGroup() as group:
        proc = group.spawn("chatty", [sys.executable, "-c", code], pipe=True)
        assert [proc.read_line(10) for _ in range(3)] == [b"one\n", b"two\n", b"three\n"]
        with pytest.raises(HarnessError, match="no answer"):
            proc.read_line(0.2)


def test_last_words_pick_the_error_line() -> None:
    code = "import sys; print('starting'); print('Traceback ...'); print('NameError: oops'); print('  |  ')"
    with ProcessGroup() as group:
        proc = group.spawn("crash", [sys.executable, "-c", code])
        proc.popen.wait(10)
        assert proc.last_words() == "NameError: oops"
        quiet = group.spawn("quiet", [sys.executable, "-c", "print('just this')"])
        quiet.popen.wait(10)
        assert quiet.last_words() == "just this"


def test_a_few_milliseconds_of_cpu_are_measured_not_rounded_to_a_clock_tick() -> None:
    """A child spends about 4 ms of CPU between two lines; /proc's clock ticks (10 ms) would mostly say 0."""
    code = (
        "import sys, time\n"
        "sys.stdin.readline()\n"
        "t0 = time.thread_time()\n"
        "while time.thread_time() - t0 < 0.004:\n"
        "    pass\n"
        "print(time.thread_time() - t0, flush=True)\n"
        "sys.stdin.readline()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        time.sleep(0.3)  # the interpreter has started and waits for the line
        watch = CpuWatch({"child": child.pid})
        watch.start()
        child.stdin.write("go\n")
        child.stdin.flush()
        spent = float(child.stdout.readline())
        measured = watch.stop()["child"]["cpu_s"]
        child.kill()
    assert spent <= measured < spent + 0.002
