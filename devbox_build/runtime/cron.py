"""devbox-cron: run ~/.config/devbox/crontab inside the container, as its user.

The crontab lives on the home volume, so a recreated container runs the same jobs: the start
hook starts this runner once per container, and it reads the file again whenever it changes, so
a crontab written in a running container runs without a restart. No root, no system cron daemon.

    # ~/.config/devbox/crontab: five fields (minute hour day month weekday), or six with seconds
    # first; @reboot, @hourly, @daily, @weekly, @monthly; NAME=value lines set the environment.
    */15 * * * *  python3 ~/jobs/sync.py
    @reboot       ~/jobs/warm-cache.sh

    devbox-cron [--detach]     run (in the background with --detach; once per container)
    devbox-cron --check        parse the crontab, print each job, exit 2 when a line is wrong

A line that cannot be read is named (file and line) and skipped; the other jobs run. Jobs run
with /bin/sh -c from your home; their output goes to ~/.local/state/devbox/cron.log.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import subprocess
import time
from dataclasses import dataclass

from . import contract
from .log import Messages

LOCK = "/tmp/devbox-cron.lock"
say = Messages("devbox-cron")
NICKNAMES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
             "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
             "@annually": "0 0 1 1 *"}
# (name, lowest, highest) of each field, seconds first.
FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31),
          ("month", 1, 12), ("weekday", 0, 7))
MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()
DAYS = "sun mon tue wed thu fri sat".split()


def crontab_path() -> str:
    return contract.home_path(contract.CRONTAB)


def log_path() -> str:
    return os.path.join(contract.home_path(contract.STATE), "cron.log")


class CrontabError(Exception):
    """The crontab as a whole cannot be read (not text, not a file): exit status 2."""


@dataclass(frozen=True)
class Job:
    line: int
    command: str
    times: tuple | None  # None: @reboot
    day_any: bool = True
    weekday_any: bool = True

    def due(self, moment: datetime.datetime) -> bool:
        if self.times is None:
            return False
        second, minute, hour, day, month, weekday = self.times
        if not (moment.second in second and moment.minute in minute and moment.hour in hour
                and moment.month in month):
            return False
        on_day = moment.day in day
        on_weekday = (moment.isoweekday() % 7) in weekday
        # cron's rule: with both day fields restricted, either one matching is enough.
        if self.day_any or self.weekday_any:
            return on_day and on_weekday
        return on_day or on_weekday

    @property
    def every_second(self) -> bool:
        """Whether it may fall due on a second other than :00."""
        return self.times is not None and self.times[0] != frozenset({0})


@dataclass(frozen=True)
class Crontab:
    jobs: tuple
    environment: dict
    problems: tuple  # "FILE, line N: why" for each line skipped


def _value(text: str, names: list | None, offset: int) -> int:
    if names and text.lower() in names:
        return names.index(text.lower()) + offset
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def parse_field(text: str, name: str, low: int, high: int) -> frozenset:
    names = MONTHS if name == "month" else DAYS if name == "weekday" else None
    offset = 1 if name == "month" else 0
    values: set = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            raise ValueError(part)
        if body == "*":
            first, last = low, high
        elif "-" in body:
            first_text, last_text = body.split("-", 1)
            first, last = _value(first_text, names, offset), _value(last_text, names, offset)
        else:
            first = last = _value(body, names, offset)
            if step:
                last = high
        if not low <= first <= last <= high:
            raise ValueError(part)
        values.update(range(first, last + 1, step or 1))
    if name == "weekday" and 7 in values:
        values = (values - {7}) | {0}  # 7 is Sunday too
    return frozenset(values)


def _times(fields: list) -> tuple:
    return tuple(parse_field(value, *spec) for value, spec in zip(fields, FIELDS))


def schedule(words: list) -> tuple:
    """(times, number of words that were the schedule). Six fields (seconds first) only when all
    six read as a schedule: a five-field line's command (``python3 job.py``, ``/usr/bin/env``)
    is never taken for a sixth field."""
    if len(words) > 6:
        try:
            return _times(words[:6]), 6
        except ValueError:
            pass
    if len(words) <= 5:
        raise ValueError(f"expected 5 time fields and a command, found {len(words)} word(s)")
    try:
        return _times(["0", *words[:5]]), 5
    except ValueError as exc:
        raise ValueError(f"cannot read {exc} in {' '.join(words[:5])!r}") from None


def parse(text: str, path: str = "crontab") -> Crontab:
    jobs, environment, problems = [], {}, []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}, line {number}"
        first = line.split(None, 1)[0]
        if "=" in first and not first.startswith(("*", "@")) and not first[0].isdigit():
            name, _, value = line.partition("=")
            environment[name.strip()] = value.strip().strip("'\"")
            continue
        if first == "@reboot":
            command = line[len(first):].strip()
            if command:
                jobs.append(Job(number, command, None))
            else:
                problems.append(f"{where}: @reboot without a command")
            continue
        if first in NICKNAMES:
            line = NICKNAMES[first] + " " + line[len(first):].strip()
        elif first.startswith("@"):
            problems.append(f"{where}: unknown schedule {first}")
            continue
        words = line.split()
        try:
            times, count = schedule(words)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        fields = (["0"] if count == 5 else []) + words[:count]
        jobs.append(Job(number, line.split(None, count)[count], times,
                        day_any=fields[3] == "*", weekday_any=fields[5] == "*"))
    return Crontab(tuple(jobs), environment, tuple(problems))


def read(path: str) -> Crontab:
    """The crontab at ``path``; CrontabError when the file as a whole is not a crontab."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except IsADirectoryError:
        raise CrontabError(f"{path} is a folder, not a crontab file") from None
    except OSError as exc:
        raise CrontabError(f"{path}: {exc.strerror}") from None
    if b"\0" in data:
        hint = " (UTF-16? save it as UTF-8)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise CrontabError(f"{path} is not a text file: it holds NUL bytes{hint}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CrontabError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    return parse(text, path)


def run(job: Job, environment: dict) -> None:
    os.makedirs(os.path.dirname(log_path()), exist_ok=True)
    with open(log_path(), "a") as log:
        log.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} line {job.line}: "
                  f"{job.command}\n")
        log.flush()
        subprocess.Popen(["/bin/sh", "-c", job.command], cwd=os.path.expanduser("~"),
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env={**os.environ, **environment}, start_new_session=True)


def loop() -> int:
    lock = open(LOCK, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # one runner per container
    path = crontab_path()
    loaded, crontab = None, Crontab((), {}, ())
    rebooted: set = set()
    last = int(time.time())
    while True:
        try:
            info = os.stat(path)
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        except OSError:
            stamp, crontab = None, Crontab((), {}, ())
        if stamp != loaded and stamp is not None:
            try:
                crontab = read(path)
            except CrontabError as exc:
                say(f"{exc}; no job runs until it is fixed")
                crontab = Crontab((), {}, ())
            for problem in crontab.problems:
                say(f"{problem}; skipped, the other jobs run")
            loaded = stamp
            # A crontab that just appeared or changed runs from this second on: the seconds
            # before it was read are not caught up.
            last = max(last, int(time.time()) - 1)
            # @reboot: once per container, for each line the first time it is seen.
            for job in crontab.jobs:
                if job.times is None and (job.line, job.command) not in rebooted:
                    rebooted.add((job.line, job.command))
                    run(job, crontab.environment)
        now = int(time.time())
        # Every second since the last pass, so a slow pass never skips a job.
        for second in range(max(last + 1, now - 60), now + 1):
            moment = datetime.datetime.fromtimestamp(second)
            for job in crontab.jobs:
                if job.due(moment):
                    run(job, crontab.environment)
        last = now
        # Reap finished jobs; the runner is not their init.
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        # Wake each second for second-level jobs; else every few seconds (a changed file is
        # read within that), and never past the next minute.
        fine = any(job.every_second for job in crontab.jobs)
        time.sleep(max(0.05, (1 if fine else min(5, 60 - time.time() % 60)) - time.time() % 1))


def detach() -> int:
    if os.fork():
        print(f"runner started, log {log_path()}")
        return 0
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    os.makedirs(os.path.dirname(log_path()), exist_ok=True)
    log = os.open(log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os._exit(loop())


def check() -> int:
    path = crontab_path()
    if not os.path.lexists(path):
        say(f"no crontab at {path}")
        return 2
    try:
        crontab = read(path)
    except CrontabError as exc:
        say(str(exc))
        return 2
    for job in crontab.jobs:
        print(f"line {job.line}: {'at start' if job.times is None else 'scheduled'}: "
              f"{job.command}")
    for problem in crontab.problems:
        say(problem)
    return 2 if crontab.problems else 0


def main(argv: list) -> int:
    assert __doc__
    parser = argparse.ArgumentParser(prog="devbox-cron", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--detach", action="store_true", help="run in the background")
    parser.add_argument("--check", action="store_true", help="parse the crontab and exit")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    if args.detach:
        return detach()
    try:
        return loop()
    except KeyboardInterrupt:
        return 130
