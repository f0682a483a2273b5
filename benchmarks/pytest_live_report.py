"""pytest plugin for runs under a time limit: reports each failure the moment it happens and
can stop the session cleanly before a deadline, so a run cut short still says what failed.

    python -m pytest -p pytest_live_report --stop-after 120 tests/...   # benchmarks/ on PYTHONPATH
    python -m pytest -p pytest_live_report --stop-at $(($(date +%s) + 120)) tests/...

Each failing phase (setup, call, teardown) prints, flushed, one line
    !! FAILED <nodeid> [<phase>] <first line of the error>
and a progress line every --progress-every tests:
    -- progress: 120/300 tests, 2 failed, 0 errors, 40 skipped, 31 s
With --stop-after S no test starts once S seconds have passed since the session began (with
--stop-at T, once the clock, in seconds since the epoch, has passed T): the
session ends as if interrupted, pytest prints its usual summary (with -rfE the failures'
names), and the plugin prints how many collected tests did not run.
"""

import sys
import time

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("live_report")
    group.addoption(
        "--stop-after", type=float, default=None, help="start no test after this many seconds from the session's start"
    )
    group.addoption(
        "--stop-at",
        type=float,
        default=None,
        help="start no test once time.time() has passed this (seconds since the epoch)",
    )
    group.addoption("--progress-every", type=int, default=50, help="a progress line every N tests")


class LiveReport:
    def __init__(self, config):
        self.config = config
        self.stop_after = config.getoption("--stop-after")
        self.stop_at = config.getoption("--stop-at")
        self.every = max(1, config.getoption("--progress-every"))
        self.start = time.monotonic()
        self.collected = 0
        self.done = 0
        self.failed = 0
        self.errors = 0
        self.skipped = 0
        self.stopped_early = False

    def _write(self, line):
        tr = self.config.pluginmanager.getplugin("terminalreporter")
        if tr is not None:
            if getattr(tr._tw, "width_of_current_line", 1):  # after progress dots
                tr._tw.line()
            tr.write_line(line)
        else:
            print(line)
        sys.stdout.flush()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        self.collected = len(items)

    def pytest_sessionstart(self, session):
        self.start = time.monotonic()

    def pytest_runtest_logreport(self, report):
        if report.failed:
            if report.when == "call":
                self.failed += 1
            else:
                self.errors += 1
            message = ""
            crash = getattr(report.longrepr, "reprcrash", None)
            if crash is not None:
                message = crash.message
            elif report.longrepr is not None:
                message = str(report.longrepr).strip().splitlines()[-1] if str(report.longrepr).strip() else ""
            message = message.strip().splitlines()[0][:200] if message.strip() else ""
            self._write(f"!! FAILED {report.nodeid} [{report.when}] {message}")
        elif report.skipped and report.when in ("setup", "call"):
            self.skipped += 1
        if report.when == "teardown":
            self.done += 1
            if self.done % self.every == 0:
                self._write(self._progress())

    def _progress(self):
        return (
            f"-- progress: {self.done}/{self.collected} tests, {self.failed} failed, {self.errors} errors, "
            f"{self.skipped} skipped, {time.monotonic() - self.start:.0f} s"
        )

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        # past the limit: this item counts as handled without running, and the session stops
        over = self.stop_after is not None and time.monotonic() - self.start > self.stop_after
        over = over or (self.stop_at is not None and time.time() > self.stop_at)
        if over:
            self.stopped_early = True
            item.session.shouldstop = f"time limit: no test starts after {time.monotonic() - self.start:.0f} s"
            return True
        return None

    def pytest_sessionfinish(self, session, exitstatus):
        line = self._progress()
        if self.done < self.collected:
            line += f"; {self.collected - self.done} collected tests did not run"
            if self.stopped_early:
                line += " (time limit)"
        self._write(line.replace("-- progress:", "-- final:"))


def pytest_configure(config):
    config.pluginmanager.register(LiveReport(config), "live_report_instance")
