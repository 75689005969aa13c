"""The output file as the ledger of what is done: exactly one result line per custom_id.

    BatchOutputError             the output cannot be used as it is (nothing was sent)
    ├── OutputLocked             another run is writing it
    ├── OutputDamaged            a line other than the last is not a result, or an id has two
    ├── InputChanged             done ids whose request in this input differs
    └── OutputWriteFailed        a write failed mid-run (full disk, file size limit): the run stopped

One writer at a time: a run holds an exclusive `flock` on the output file itself until it closes
(the kernel drops it when the process dies, even by SIGKILL). On the file, not on a name, so that
every name of it (a symlink, a hard link) is refused while a run writes it, and no lock file is
left behind. It is taken when the output is opened, before it is read or repaired; a rewrite
(`rerun_changed`) locks the new file before renaming it over the output, and an opener that locked
the file just replaced opens the output again. Refused before anything is opened: the input itself
(its requests would be read as results), and what is not a regular file (/dev/null, a FIFO: results
written there are not kept).

On start it reads the results already there (a re-run after a crash). Only a torn last line is
repaired (cut, or given its newline when it is whole): results are appended as whole lines under
the lock, so a bad line anywhere else was put there by something else, and the run is refused
with its line number rather than deleting the good lines after it (or writing a second result
for an id the bad line may hold).

`OUT.manifest` records what each result answers: `[custom_id, fingerprint of its request]`
lines, each written just before its result. A sidecar, so that the result lines stay exactly
the provider's batch result format (tools that validate them strictly still read them); a re-run
whose input reuses an id for a different request is refused, or re-runs those ids on request.

Results are appended one line per write (looped over short writes) and flushed at once, so a
killed runner loses nothing it has written; `fsync` is batched (every `sync_every` lines or
`sync_interval` seconds, and at close) against power loss. The first failed write takes its
partial line back and stops the ledger: later writes are refused with the same error, so the
file never gets a bad line in the middle. Files are created 0600: the answers are private data.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import msgspec

from ..filelock import lock_file

_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder()
_TORN = object()  # a line that is not JSON
MODE = 0o600
_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT
SHOWN = 20  # ids or lines named in a message


class BatchOutputError(Exception):
    """The output file cannot be used as it is; the message says what to do."""


class OutputLocked(BatchOutputError):
    """Another run holds the output's lock."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(
            f"another isopool batch is writing {path} (pid {holder or '?'}); nothing was sent. Wait for it to "
            "finish, or write to another output file."
        )


class OutputDamaged(BatchOutputError):
    """Lines that are not results isopool wrote, before the last line; `problems` names them."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.problems = problems
        more = f"\n... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        super().__init__(
            f"{path} has lines that isopool did not write as they are; nothing was sent. Results are only "
            "appended as whole lines, so these were changed by something else: fix or delete them (a deleted "
            "result's id runs again), or write to another output file.\n" + "\n".join(problems[:SHOWN]) + more
        )


class InputChanged(BatchOutputError):
    """Ids already answered in the output whose request in this input differs; `ids` lists them."""

    def __init__(self, path: str, source: str, ids: list[str]) -> None:
        self.ids = ids
        shown = ", ".join(repr(i) for i in ids[:SHOWN]) + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")
        super().__init__(
            f"{path} already holds results for {len(ids)} custom_id(s) whose request in {source} is different: "
            f"{shown}. Nothing was sent. Write to another output file, or pass --rerun-changed "
            "(rerun_changed=True from Python) to replace those results (each is sent again)."
        )


class OutputWriteFailed(BatchOutputError):
    """A write to the output failed mid-run; the run stopped sending and what was written is kept."""

    def __init__(self, path: str, error: OSError, done: int) -> None:
        super().__init__(
            f"could not write to {path} ({error.strerror or error}); the run stopped sending. The {done} results "
            "in it are kept: free space and re-run the same command: done ids are skipped."
        )


def write_all(fd: int, data: bytes) -> None:
    """`os.write` may write only part (a signal, a nearly full disk, a file size limit): loop until all is written."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write() wrote nothing")
        view = view[written:]


class _Scan(NamedTuple):
    records: list[tuple[int, Any]]  # (line number, decoded line) of each whole line
    problems: list[str]
    end: int  # where the file ends once a torn last line is cut
    unterminated: bool  # the last line is whole but lacks its newline


def _decode(line: bytes) -> Any:
    try:
        return _DEC.decode(line)
    except msgspec.DecodeError:
        return _TORN


def scan(path: str, data: bytes, valid: Callable[[Any], bool], what: str) -> _Scan:
    """Each line of an append-only file; only the last may be torn (cut mid-write: not JSON)."""
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: list[tuple[int, Any]] = []
    problems: list[str] = []
    offset = 0
    for i, line in enumerate(lines):
        if line.strip():
            record = _decode(line)
            if record is not _TORN and valid(record):
                records.append((i + 1, record))
            elif i == last and record is _TORN:  # a cut object is never JSON: a JSON line is not torn
                return _Scan(records, problems, offset, False)
            else:
                problems.append(f"{path}:{i + 1}: " + ("not JSON" if record is _TORN else f"not {what}"))
        offset += len(line) + 1
    return _Scan(records, problems, len(data), bool(data) and not data.endswith(b"\n"))


def _is_result(record: Any) -> bool:
    """A result line as formats.py and jobs.py write them: Anthropic's (and a job's) `result`, OpenAI's
    `response` and `error`. A request line (a custom_id with its `params` or `body`) is not one."""
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
        return False
    return isinstance(record.get("result"), dict) or ("response" in record and "error" in record)


def _is_entry(record: Any) -> bool:
    return isinstance(record, list) and len(record) == 2 and all(isinstance(field, str) for field in record)


class _Appender:
    """One append-only file of whole lines; a write that fails takes its partial line back."""

    def __init__(self, path: str, display: str, valid: Callable[[Any], bool], what: str, locked: bool = False) -> None:
        self.path, self.display = path, display
        self.fd = _open_locked(path, display) if locked else os.open(path, _FLAGS, MODE)
        self.size = 0
        self.repaired = 0  # bytes of a torn last line cut off
        try:
            self.records = self._recover(valid, what)
        except BaseException:
            self.close()
            raise

    def _recover(self, valid: Callable[[Any], bool], what: str) -> list[tuple[int, Any]]:
        """The file's records, after cutting a torn last line (or ending a whole one); refused if damaged."""
        data = self.read()
        found = scan(self.display, data, valid, what)
        if found.problems:
            raise OutputDamaged(self.display, found.problems)
        self.size = len(data)
        if found.end < len(data):
            os.ftruncate(self.fd, found.end)
            os.fsync(self.fd)
            self.size, self.repaired = found.end, len(data) - found.end
        elif found.unterminated:
            self.append(b"\n")
        return found.records

    def read(self) -> bytes:
        chunks, offset = [], 0
        while chunk := os.pread(self.fd, 1 << 24, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def append(self, data: bytes) -> None:
        try:
            write_all(self.fd, data)
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)  # a partial line would be a bad line in the middle later
            except OSError:
                pass  # then it is the torn last line the next run cuts
            raise
        self.size += len(data)

    def replace(self, data: bytes) -> None:
        """Write `data` to a new file and rename it over this one (same mode, and this one's lock, taken
        before the rename): all or nothing."""
        temporary = self.path + ".rewrite"
        fd = os.open(temporary, _FLAGS | os.O_TRUNC, MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, stat.S_IMODE(os.fstat(self.fd).st_mode))
            write_all(fd, data)
            os.fsync(fd)
            os.replace(temporary, self.path)
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self.fd, self.size = fd, len(data)
        directory = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_locked(path: str, display: str) -> int:
    """`path` opened (created if new) and locked for the run; refused if another run holds it."""
    fd = lock_file(path, _FLAGS, MODE)
    if fd is None:
        raise OutputLocked(display, _holder(path))
    return fd


def _holder(path: str) -> str:
    """The pid holding a flock on the file at `path`, from /proc/locks (Linux; '' elsewhere)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for fields in map(str.split, locks):
                if "FLOCK" in fields and file in fields:
                    return fields[fields.index(file) - 1]
    except OSError:
        pass
    return ""


def refuse_unusable(path: str, source: str) -> None:
    """Before the output is opened: refused if it is the input (by any name: its requests would be read as
    results, and none sent) or exists and is not a regular file (results written there are not kept)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BatchOutputError(f"cannot use {path} as the batch output: {exc}; nothing was sent") from exc
    if os.path.exists(source) and os.path.samefile(path, source):
        raise BatchOutputError(
            f"{path} is the input file {source}; nothing was sent. Write the results to another output file."
        )
    if not stat.S_ISREG(found.st_mode):
        raise BatchOutputError(
            f"{path} is not a regular file, and results written there would not be kept; nothing was sent. "
            "Write the results to a regular file (a new one, or the output of an earlier run)."
        )


class Ledger:
    """The output of one run: locked, recovered, and appended to one result at a time."""

    def __init__(self, path: str, sync_every: int = 64, sync_interval: float = 0.2, *, source: str = "") -> None:
        """`source`: the input, refused as the output."""
        self.path = path
        self.done: set[str] = set()
        self._results: _Appender | None = None
        self._manifest: _Appender | None = None
        self._recorded: dict[str, str] = {}  # custom_id -> fingerprint of the request its result answers
        self._expected: dict[str, str] = {}  # the same, for this run's input
        self._failure: OutputWriteFailed | None = None
        self._unsynced = 0
        self._synced_at = time.monotonic()
        self._sync_every, self._sync_interval = sync_every, sync_interval
        refuse_unusable(path, source)
        real = os.path.realpath(path)  # the manifest goes with the file, whatever symlink names it
        try:
            self._results = _Appender(real, path, _is_result, "a result line", locked=True)
            self.done = self._index(self._results.records)
            self._manifest = _Appender(real + ".manifest", path + ".manifest", _is_entry, "a manifest entry")
            self._recorded = dict(record for _, record in self._manifest.records)
        except BaseException as exc:
            self.close()
            if isinstance(exc, OSError):
                raise BatchOutputError(f"cannot use {path} as the batch output: {exc}; nothing was sent") from exc
            raise

    @property
    def repaired(self) -> int:
        """Bytes of a torn last line cut off the output."""
        return self._results.repaired if self._results else 0

    def _index(self, records: list[tuple[int, Any]]) -> set[str]:
        """The ids answered; an id answered twice is damage (the file is exactly-once or it is not ours)."""
        first: dict[str, int] = {}
        problems = []
        for number, record in records:
            custom_id = record["custom_id"]
            if custom_id in first:
                problems.append(f"{self.path}:{number}: a second result for {custom_id!r} (first on line "
                                f"{first[custom_id]})")  # fmt: skip
            first.setdefault(custom_id, number)
        if problems:
            raise OutputDamaged(self.path, problems)
        return set(first)

    def match_input(self, fingerprints: dict[str, str], source: str, rerun_changed: bool = False) -> list[str]:
        """Check the done ids against this input's requests (custom_id -> fingerprint, in input order), and
        record each new result's fingerprint from now on. A done id whose recorded request differs is refused
        (InputChanged) or, with `rerun_changed`, its result is taken out so that it runs again: those ids are
        returned. A result with no recorded fingerprint (an output written before manifests) is kept as it is."""
        changed = [cid for cid, new in fingerprints.items() if cid in self.done and self._recorded.get(cid, new) != new]
        if changed and not rerun_changed:
            raise InputChanged(self.path, source, changed)
        if changed:
            with self._stopping_on_error():
                self._forget(set(changed))
        self._expected = fingerprints
        return changed

    def _forget(self, ids: set[str]) -> None:
        assert self._results is not None
        lines = self._results.read().split(b"\n")
        kept = [line + b"\n" for line in lines if line.strip() and _DEC.decode(line)["custom_id"] not in ids]
        self._results.replace(b"".join(kept))
        self.done -= ids

    def write(self, record: dict[str, Any]) -> None:
        """Append one result (exactly once per custom_id: a second one is a bug, and refused), after its
        request's fingerprint in the manifest."""
        if self._failure is not None:
            raise self._failure
        custom_id = record["custom_id"]
        if custom_id in self.done:
            raise ValueError(f"custom_id {custom_id!r} already has a result")
        assert self._results is not None and self._manifest is not None
        with self._stopping_on_error():
            if fingerprint := self._expected.get(custom_id):
                self._manifest.append(_ENC.encode([custom_id, fingerprint]) + b"\n")
            self._results.append(_ENC.encode(record) + b"\n")  # one line: whole, or taken back
            self.done.add(custom_id)
            self._unsynced += 1
            now = time.monotonic()
            if self._unsynced >= self._sync_every or now - self._synced_at >= self._sync_interval:
                self.sync(now)

    def sync(self, now: float | None = None) -> None:
        if self._unsynced and self._results and self._manifest:
            os.fsync(self._manifest.fd)  # first: a result is never on disk without what it answers
            os.fsync(self._results.fd)
            self._unsynced = 0
        self._synced_at = now or time.monotonic()

    @contextmanager
    def _stopping_on_error(self) -> Iterator[None]:
        """The first failed write stops the ledger: no line is written after a lost one."""
        try:
            yield
        except OSError as exc:
            self._failure = OutputWriteFailed(self.path, exc, len(self.done))
            raise self._failure from exc

    def close(self) -> None:
        """Sync, close the files and release the lock (the output's, last); a failed sync is raised (results
        may not be on disk)."""
        try:
            if self._failure is None:
                with self._stopping_on_error():
                    self.sync()
        finally:
            for appender in (self._manifest, self._results):
                if appender is not None:
                    appender.close()
