"""Batch output stays exactly-once when people make mistakes: a second writer on the same output,
a re-run with a different input under the same ids, a damaged output file, short writes, a
full disk, and results that are private data (issue 15, items 12-15)."""

from __future__ import annotations

import json
import os
import resource
import subprocess

import pytest

import broker.batch
from broker.batch import ledger, run, run_job
from broker.batch.ledger import BatchOutputError, InputChanged, Ledger, OutputDamaged, OutputLocked

from .conftest import wait_for
from .test_batch import ISOPOOL, anthropic_lines, bodies, openai_lines, read_jsonl, write_jsonl


def served(fake) -> int:
    return sum(fake.stats()["served"].values())


def cli(*args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run([ISOPOOL, "batch", *args], capture_output=True, text=True, timeout=120, **options)


def test_a_second_batch_on_the_same_output_is_refused_and_each_id_is_written_once(tmp_path, pool, own_processes):
    # each line takes about 0.6 s, four at once: the first run holds the output for several seconds
    source = write_jsonl(tmp_path / "in.jsonl", openai_lines(40, model="gpt-fake@slow-first:delay=0.6"))
    out = tmp_path / "out.jsonl"
    command = [ISOPOOL, "batch", source, "-o", str(out), "--pool", pool.url, "-c", "4", "--json"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 0, 60, "the first run's first result")
        second = cli(source, "-o", str(out), "--pool", pool.url, "-c", "4", "--json")
        with pytest.raises(OutputLocked) as caught:
            run(source, str(out), pool=pool)
        assert first.poll() is None, "the first run ended before the second tried: the test proved nothing"
    finally:
        stdout, stderr = first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr
    assert "another isopool batch is writing" in second.stderr and "Traceback" not in second.stderr
    assert f"pid {first.pid}" in str(caught.value)
    assert first.returncode == 0, stderr
    ids = [r["custom_id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(40))  # each once


def test_a_rerun_with_a_different_input_reusing_ids_is_refused_and_names_them(tmp_path, fake, pool):
    first = openai_lines(5)
    out = tmp_path / "out.jsonl"
    run(write_jsonl(tmp_path / "a.jsonl", first), str(out), pool=pool)
    written = out.read_bytes()

    # the same requests reformatted (keys reordered) are the same requests: nothing to do
    reordered = tmp_path / "a2.jsonl"
    reordered.write_text("".join(json.dumps(dict(reversed(list(line.items())))) + "\n" for line in first))
    assert run(str(reordered), str(out), pool=pool).already_done == 5

    second = openai_lines(5)
    for i in (1, 3):
        second[i]["body"]["messages"][0]["content"] = f"another question {i}"
    second += openai_lines(1, start=9)
    source = write_jsonl(tmp_path / "b.jsonl", second)
    before = served(fake)
    with pytest.raises(InputChanged) as caught:
        run(source, str(out), pool=pool)
    message = str(caught.value)
    assert "'req-1', 'req-3'" in message and "'req-0'" not in message and "--rerun-changed" in message
    refused = cli(source, "-o", str(out), "--pool", pool.url)
    assert refused.returncode == 2 and "'req-1', 'req-3'" in refused.stderr and "Traceback" not in refused.stderr
    assert served(fake) == before and out.read_bytes() == written  # nothing sent, nothing changed

    summary = run(source, str(out), pool=pool, rerun_changed=True)
    assert summary.rerun_changed == 2 and summary.already_done == 3 and summary.ok == 3
    reference = tmp_path / "reference.jsonl"
    run(source, str(reference), pool=pool)
    results = read_jsonl(out)
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in second)  # each once
    assert bodies(results) == bodies(read_jsonl(reference))  # req-1 and req-3 answer the second input
    assert all(set(r) == {"id", "custom_id", "response", "error"} for r in results)  # the provider's schema


def test_a_bad_line_in_the_middle_of_the_output_keeps_the_good_lines_after_it(tmp_path, fake, pool):
    source = write_jsonl(tmp_path / "in.jsonl", openai_lines(6))
    out = tmp_path / "out.jsonl"
    run(source, str(out), pool=pool)
    lines = out.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"custom_id": "req-2", "respo\n'  # damaged by an editor, a bad merge, a disk
    out.write_bytes(b"".join(lines))
    before = served(fake)
    with pytest.raises(OutputDamaged) as caught:
        run(source, str(out), pool=pool)
    assert f"{out}:3: not JSON" in str(caught.value) and "nothing was sent" in str(caught.value)
    assert out.read_bytes() == b"".join(lines) and served(fake) == before  # the good lines after it are kept

    refused = cli(source, "-o", str(out), "--pool", pool.url)
    assert refused.returncode == 2 and f"{out}:3: not JSON" in refused.stderr and "Traceback" not in refused.stderr

    del lines[2]  # what the message says to do: fix or delete the line; its id runs again
    out.write_bytes(b"".join(lines))
    summary = run(source, str(out), pool=pool)
    assert summary.already_done == 5 and summary.ok == 1
    assert sorted(r["custom_id"] for r in read_jsonl(out)) == [f"req-{i}" for i in range(6)]


def test_only_a_torn_last_line_is_repaired_and_a_whole_one_is_completed(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = b'{"custom_id":"a","result":{"type":"succeeded"}}\n'
    out.write_bytes(whole + b"\n" + whole.replace(b'"a"', b'"b"') + b'{"custom_id":"c","res\n')
    ledger = Ledger(str(out))
    ledger.close()
    assert ledger.done == {"a", "b"} and ledger.repaired == len(b'{"custom_id":"c","res\n')
    out.write_bytes(whole + whole.replace(b'"a"', b'"b"').rstrip(b"\n"))  # killed just before the newline
    ledger = Ledger(str(out))
    ledger.write({"custom_id": "c", "result": {"type": "succeeded"}})
    ledger.close()
    assert [r["custom_id"] for r in read_jsonl(out)] == ["a", "b", "c"]


def test_an_output_with_an_id_answered_twice_is_refused_with_both_lines(tmp_path):
    out = tmp_path / "out.jsonl"  # what two unlocked runs used to leave
    line = b'{"custom_id":"a","result":{"type":"succeeded"}}\n'
    out.write_bytes(line + line.replace(b'"a"', b'"b"') + line)
    with pytest.raises(OutputDamaged) as caught:
        Ledger(str(out))
    assert f"{out}:3: a second result for 'a' (first on line 1)" in str(caught.value)
    assert out.read_bytes() == line + line.replace(b'"a"', b'"b"') + line


def test_short_writes_are_looped_until_the_whole_line_is_written(tmp_path, monkeypatch):
    real_write = os.write
    calls = []

    def short_write(fd: int, data: bytes) -> int:  # as a signal or a nearly full disk can make os.write do
        calls.append(len(data))
        return real_write(fd, bytes(data[:7]))

    out = tmp_path / "out.jsonl"
    ledger = Ledger(str(out))
    record = {"custom_id": "x", "result": {"type": "succeeded", "message": {"text": "a long enough answer"}}}
    monkeypatch.setattr(os, "write", short_write)
    ledger.write(record)
    monkeypatch.undo()
    ledger.close()
    assert len(calls) > 5 and read_jsonl(out) == [record]


def test_a_full_disk_stops_sending_and_a_rerun_finishes_exactly_once(tmp_path, fake, pool, own_processes):
    lines = openai_lines(100)
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    reference = tmp_path / "reference.jsonl"
    run(source, str(reference), pool=pool)
    limit = len(reference.read_bytes()) * 2 // 5  # room for about 40 of the 100 results

    def full_disk() -> None:  # in the child: a file may not grow past `limit` (EFBIG, as Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out.jsonl"
    before = served(fake)
    full = cli(source, "-o", str(out), "--pool", pool.url, "-c", "4", preexec_fn=full_disk)
    sent = served(fake) - before
    assert full.returncode == 3, full.stderr
    assert "free space and re-run the same command" in full.stderr and "Traceback" not in full.stderr
    written = read_jsonl(out)  # whole lines only: the partial one was taken back
    assert 20 < len(written) < 60 and len(out.read_bytes()) <= limit
    assert sent <= len(written) + 4 + 1  # stopped feeding: the lines written, the failed one and those in flight

    again = cli(source, "-o", str(out), "--pool", pool.url, "-c", "4", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["already_done"] == len(written)
    results = read_jsonl(out)
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in lines)  # each once
    assert bodies(results) == bodies(read_jsonl(reference))


def test_output_and_manifest_files_are_created_0600(tmp_path, pool):
    out = tmp_path / "out.jsonl"
    umask = os.umask(0o022)
    try:
        run(write_jsonl(tmp_path / "in.jsonl", openai_lines(2)), str(out), pool=pool)
    finally:
        os.umask(umask)
    for path in (out, tmp_path / "out.jsonl.manifest"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o600), path


JOBS = """
def echo(line, ctx):
    return line["question"]


def ask(line, ctx):
    messages = [{"role": "user", "content": line["question"]}]
    return ctx.openai.chat.completions.create(model="gpt-fake", messages=messages).choices[0].message.content


async def ask_async(line, ctx):
    messages = [{"role": "user", "content": line["question"]}]
    return (await ctx.openai.chat.completions.create(model="gpt-fake", messages=messages)).choices[0].message.content
"""


def questions(n: int) -> list[dict]:
    return [{"custom_id": f"q{i}", "question": f"question {i}"} for i in range(n)]


def job_cli(tmp_path, source: str, out, job: str, *args: str, **options) -> subprocess.CompletedProcess:
    """`isopool batch --job isopool_test_jobs:JOB`, the module importable from the run's directory."""
    (tmp_path / "isopool_test_jobs.py").write_text(JOBS)
    return cli(source, "-o", str(out), "--job", f"isopool_test_jobs:{job}", *args, cwd=tmp_path, **options)


def outputs(path) -> dict[str, object]:
    results = read_jsonl(path)
    assert len({r["custom_id"] for r in results}) == len(results)  # each id once
    return {r["custom_id"]: r["result"]["output"] for r in results}


def test_a_job_rerun_with_a_different_input_reusing_ids_is_refused_or_run_again(tmp_path, pool):
    calls = []

    def echo(line, ctx):
        calls.append(line["custom_id"])
        return line["question"]

    first = questions(5)
    out = tmp_path / "out.jsonl"
    run_job(write_jsonl(tmp_path / "a.jsonl", first), str(out), echo, pool=pool)
    written = out.read_bytes()
    reordered = write_jsonl(tmp_path / "a2.jsonl", [dict(reversed(list(line.items()))) for line in first])
    assert run_job(reordered, str(out), echo, pool=pool).already_done == 5  # the same lines, keys reordered

    second = questions(5) + [{"custom_id": "q9", "question": "question 9"}]
    for i in (1, 3):
        second[i]["question"] = f"another question {i}"
    source = write_jsonl(tmp_path / "b.jsonl", second)
    calls.clear()
    with pytest.raises(InputChanged) as caught:
        run_job(source, str(out), echo, pool=pool)
    assert "'q1', 'q3'" in str(caught.value) and "'q0'" not in str(caught.value)
    refused = job_cli(tmp_path, source, out, "echo", "--pool", pool.url)
    assert refused.returncode == 2 and "'q1', 'q3'" in refused.stderr and "Traceback" not in refused.stderr
    assert calls == [] and out.read_bytes() == written  # nothing run, nothing changed

    again = job_cli(tmp_path, source, out, "echo", "--pool", pool.url, "--rerun-changed", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["rerun_changed"] == 2 and summary["already_done"] == 3 and summary["ok"] == 3
    assert outputs(out) == {line["custom_id"]: line["question"] for line in second}  # q1, q3 answer the new input


@pytest.mark.parametrize("job", ["ask", "ask_async"])
def test_a_full_disk_stops_a_job_batch_and_a_rerun_finishes_exactly_once(tmp_path, fake, pool, own_processes, job):
    source = write_jsonl(tmp_path / "in.jsonl", questions(100))
    reference = tmp_path / "reference.jsonl"
    assert job_cli(tmp_path, source, reference, job, "--pool", pool.url).returncode == 0
    limit = len(reference.read_bytes()) * 2 // 5  # room for about 40 of the 100 results

    def full_disk() -> None:  # in the child: a file may not grow past `limit` (EFBIG, as Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out.jsonl"
    before = served(fake)
    full = job_cli(tmp_path, source, out, job, "--pool", pool.url, "-c", "4", preexec_fn=full_disk)
    sent = served(fake) - before
    assert full.returncode == 3, full.stderr
    assert "free space and re-run the same command" in full.stderr and "Traceback" not in full.stderr
    written = read_jsonl(out)  # whole lines only
    assert 20 < len(written) < 60 and len(out.read_bytes()) <= limit
    assert sent <= len(written) + 4 + 1, sent  # stopped: the lines written, the failed one and those in flight

    again = job_cli(tmp_path, source, out, job, "--pool", pool.url, "-c", "4", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["already_done"] == len(written)
    assert outputs(out) == outputs(reference)


def test_the_output_errors_are_exported_by_the_batch_package():
    for name in ("BatchOutputError", "OutputLocked", "OutputDamaged", "InputChanged", "OutputWriteFailed"):
        assert name in broker.batch.__all__ and getattr(broker.batch, name, None) is getattr(ledger, name), name


def test_the_summary_shows_how_many_changed_requests_ran_again(tmp_path, pool):
    out = tmp_path / "out.jsonl"
    first = openai_lines(3)
    run(write_jsonl(tmp_path / "a.jsonl", first), str(out), pool=pool)
    unchanged = cli(write_jsonl(tmp_path / "a.jsonl", first), "-o", str(out), "--pool", pool.url)
    assert unchanged.returncode == 0 and "changed" not in unchanged.stdout  # shown only when there are some
    first[1]["body"]["messages"][0]["content"] = "another question"
    summary = cli(write_jsonl(tmp_path / "b.jsonl", first), "-o", str(out), "--pool", pool.url, "--rerun-changed")
    assert summary.returncode == 0, summary.stderr
    row = next((line for line in summary.stdout.splitlines() if "request changed, run again" in line), "")
    assert row.split("│")[2].split()[0] == "1", summary.stdout


def test_the_input_given_as_the_output_is_refused_by_any_of_its_names(tmp_path, fake, pool):
    """Its requests were read as results of an earlier run: all "already done", nothing sent, exit 0."""
    source = tmp_path / "in.jsonl"
    write_jsonl(source, anthropic_lines(3))
    written = source.read_bytes()
    (tmp_path / "symlink.jsonl").symlink_to(source)
    os.link(source, tmp_path / "hardlink.jsonl")
    before = served(fake)
    for name in ("in.jsonl", "symlink.jsonl", "hardlink.jsonl"):
        refused = cli(str(source), "-o", str(tmp_path / name), "--pool", pool.url, "--json")
        assert refused.returncode == 2, (name, refused.stdout, refused.stderr)
        assert "is the input" in refused.stderr and "another output file" in refused.stderr, refused.stderr
        with pytest.raises(BatchOutputError, match="is the input"):
            run(str(tmp_path / name), str(source), pool=pool)
    assert served(fake) == before and source.read_bytes() == written
    assert not list(tmp_path.glob("*.manifest"))


@pytest.mark.parametrize("lines", [openai_lines(2), anthropic_lines(2), anthropic_lines(1)])
def test_an_output_of_request_lines_is_refused_as_not_results(tmp_path, lines):
    """Any line with a string custom_id was taken for a result; a request is not one (nor cut as a torn
    last line when it lacks its newline)."""
    out = tmp_path / "out.jsonl"
    out.write_text("\n".join(json.dumps(line) for line in lines))  # the last line without its newline
    written = out.read_bytes()
    with pytest.raises(OutputDamaged) as caught:
        Ledger(str(out))
    assert f"{out}:1: not a result line" in str(caught.value)
    assert out.read_bytes() == written


def test_the_lock_is_on_the_output_file_whatever_names_it(tmp_path):
    """A lock per name (OUT.lock) let two runs through two hard links of one output both write it: two
    results per id. The lock holds through a rerun_changed rewrite, and leaves no file behind."""
    out = tmp_path / "out.jsonl"
    first = Ledger(str(out))  # the output created fresh by this run
    os.link(out, tmp_path / "hardlink.jsonl")
    (tmp_path / "symlink.jsonl").symlink_to(out)
    try:
        for name in ("out.jsonl", "hardlink.jsonl", "symlink.jsonl"):
            with pytest.raises(OutputLocked) as caught:
                Ledger(str(tmp_path / name))
            assert f"pid {os.getpid()}" in str(caught.value)
        first.match_input({"a": "1"}, "in.jsonl")
        first.write({"custom_id": "a", "result": {"type": "succeeded"}})
        first.match_input({"a": "2"}, "in.jsonl", rerun_changed=True)  # the output replaced by a new file
        with pytest.raises(OutputLocked):
            Ledger(str(out))
    finally:
        first.close()
    Ledger(str(out)).close()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["hardlink.jsonl", "out.jsonl", "out.jsonl.manifest", "symlink.jsonl"]  # no lock file left


def test_requests_the_pool_refuses_are_invalid_requests_with_the_code_once(tmp_path, pool):
    """Anthropic's api_error is a retryable server error; a request the pool refuses is the caller's."""
    refused = [
        {"custom_id": "unknown-arg", "params": {**anthropic_lines(1)[0]["params"], "foo_bar": 1}},
        {"custom_id": "override", "params": {**anthropic_lines(1)[0]["params"], "extra_headers": {"x-api-key": "k"}}},
    ]
    out = tmp_path / "anthropic.jsonl"
    summary = run(write_jsonl(tmp_path / "a.jsonl", refused), str(out), pool=pool)
    assert summary.errors == {"invalid_request_error": 2}, summary.errors
    for result in read_jsonl(out):
        error = result["result"]["error"]["error"]
        assert error["type"] == "invalid_request_error" and error["message"].count("bad_request") == 1, error

    line = openai_lines(1)[0]
    line["body"]["foo_bar"] = 1
    out = tmp_path / "openai.jsonl"
    summary = run(write_jsonl(tmp_path / "o.jsonl", [line]), str(out), pool=pool)
    [result] = read_jsonl(out)
    assert summary.errors == {"bad_request": 1} and result["response"] is None
    assert result["error"]["code"] == "bad_request" and "bad_request" not in result["error"]["message"], result


@pytest.mark.parametrize(
    "option, value, allowed",
    [("--rpm", "-1", "0 or more"), ("--tpm", "-5", "0 or more"), ("--concurrency", "-3", "1 or more"),
     ("--retry-budget", "-1", "0 or more")],
)  # fmt: skip
def test_out_of_range_batch_options_are_refused_before_anything_runs(tmp_path, fake, pool, option, value, allowed):
    source = write_jsonl(tmp_path / "in.jsonl", anthropic_lines(1))
    out = tmp_path / "out.jsonl"
    before = served(fake)
    refused = cli(source, "-o", str(out), "--pool", pool.url, option, value)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"{option} " in refused.stderr and allowed in refused.stderr, refused.stderr
    keyword = option.removeprefix("--").replace("-", "_")
    with pytest.raises(ValueError, match=allowed):
        run(source, str(out), pool=pool, **{keyword: int(value)})
    assert served(fake) == before and not out.exists()


def test_a_job_with_an_out_of_range_concurrency_is_refused(tmp_path):
    with pytest.raises(ValueError, match="1 or more"):
        run_job(write_jsonl(tmp_path / "in.jsonl", questions(1)), str(tmp_path / "out.jsonl"), print, concurrency=-3)
    assert not (tmp_path / "out.jsonl").exists()


def test_an_output_that_is_not_a_regular_file_is_refused_before_anything_is_sent(tmp_path, fake, pool):
    """/dev/null took the answers, then failed its first fsync: "free space and re-run", exit 3."""
    source = write_jsonl(tmp_path / "in.jsonl", anthropic_lines(1))
    os.mkfifo(tmp_path / "fifo")
    before = served(fake)
    refused = cli(source, "-o", os.devnull, "--pool", pool.url)
    assert refused.returncode == 2 and "not a regular file" in refused.stderr, refused.stderr
    with pytest.raises(BatchOutputError, match="not a regular file"):
        run(source, str(tmp_path / "fifo"), pool=pool)
    assert served(fake) == before and not (tmp_path / "fifo.manifest").exists()


def test_a_setting_that_cannot_be_used_ends_the_command_with_its_message_not_a_traceback(tmp_path):
    """The pool's ConfigError (here from an ISOPOOL_ variable; a cloud kind without its extra is the same) came
    out of `isopool batch` and `isopool loadtest --cloud` as a traceback."""
    source = write_jsonl(tmp_path / "in.jsonl", anthropic_lines(1))
    env = dict(os.environ, ISOPOOL_STALE_TIMEOUT="nan", TMPDIR=str(tmp_path))
    ran = subprocess.run([ISOPOOL, "batch", source, "-o", str(tmp_path / "out.jsonl")], capture_output=True,
                         text=True, timeout=60, env=env)  # fmt: skip
    assert ran.returncode == 1, ran.stderr
    assert ran.stderr.strip() == "Error: invalid setting: setting stale_timeout must be a finite number > 0, got nan"
