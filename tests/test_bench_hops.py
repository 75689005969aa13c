"""bench.hops reads py-spy's raw files: a corrupted line (a count that is no integer, no stack) is skipped
and counted, instead of ending the profile with a ValueError after the whole run was recorded."""

from __future__ import annotations

from bench.hops import _functions

RAW = """\
main (app.py:1);work (app.py:5) 3
main (app.py:1);idle (app.py:9) 2
main (app.py:1);work (app.py:5) x7
main (app.py:1);work (app.py:5) ²
 4
12

main (app.py:1);work (app.py:5
main (app.py:1);work (app.py:5) 1
"""


def test_corrupted_raw_lines_are_skipped_and_counted(tmp_path):
    raw = tmp_path / "worker.txt"
    raw.write_text(RAW)
    own, inclusive, total, skipped = _functions(str(raw))
    assert total == 6 and skipped == 6
    assert own == {"work (app.py": 4, "idle (app.py": 2}
    assert inclusive == {"main (app.py": 6, "work (app.py": 4, "idle (app.py": 2}
