"""`python -m bench rescue` end to end at its tiny size: the table's structure, and that the
gateway and the shim rescued what has an answer while the plain SDK shows what they rescue from."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOL_COLUMNS = ("gateway+HTTP", "gateway+SDK(0)", "shim")


def test_the_rescue_bench_shows_the_pool_rescuing_what_the_plain_sdk_loses(tmp_path):
    results = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "-m", "bench", "rescue", "--size", "tiny", "--json", str(results)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(results.read_text())["rescue"]
    assert data["size"] == "tiny" and {t["name"] for t in data["targets"]} and data["notes"]
    cells = {row["fault"]: row["cells"] for row in data["figures"]["rows"]}
    assert list(cells) == ["http-500", "no-headers", "content-filter", "cut:after=6"]
    assert all(list(row) == [*POOL_COLUMNS, "plain SDK"] for row in cells.values())
    for column in POOL_COLUMNS:
        assert cells["http-500"][column]["outcome"] == "ok"  # retried on the primary
        assert cells["http-500"][column]["attempts"] == 2
        assert cells["no-headers"][column]["outcome"] == "ok"  # one headers_timeout, then the backup
        assert cells["no-headers"][column]["profile"] == "backup"
        assert cells["content-filter"][column]["outcome"] == "refusal"  # Anthropic's: an answer that refuses
        assert cells["content-filter"][column]["attempts"] == 1  # neither retried nor rerouted
        # a stream cut after output: continued when this build can, else a clean error, never a success
        cut = cells["cut:after=6"][column]
        if data["inputs"]["continuation"]:
            assert (cut["outcome"], cut["rescue"], cut["attempts"]) == ("ok", "prefill", 2), cut
        else:
            assert cut["outcome"] == "err", cut
    plain = {fault: row["plain SDK"]["outcome"] for fault, row in cells.items()}
    assert plain == {"http-500": "ok", "no-headers": "hung", "content-filter": "refusal", "cut:after=6": "TRUNCATED"}
    targets = {t["name"]: t for t in data["targets"]}
    assert targets["gateway and shim: truncated streams taken as success"]["value"] == 0
    assert targets["gateway and shim: calls over the 3-attempt budget"]["value"] == 0
