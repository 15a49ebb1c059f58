"""Ids, file names and URLs from storage go into the dashboard's Markdown as inert text."""

from __future__ import annotations

from segflow.pipeline.report import md_code, review_markdown


def test_review_table_keeps_hostile_ids_and_sources_as_text():
    items = [
        {"id": "a|b", "uncertainty": 0.5, "source": "[x](javascript:alert(1))"},
        {"id": "<img src=x onerror=alert(1)>", "uncertainty": 0.4, "source": "s`q``r`"},
    ]
    md = review_markdown(items, b"png", b"png", None, 2)
    rows = [line for line in md.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    # an unescaped | adds a cell: each row keeps the header's 4 cells
    assert all(line.replace("\\|", "").count("|") == 5 for line in rows), rows
    assert "`a\\|b`" in rows[0] and "`[x](javascript:alert(1))`" in rows[0]
    assert "`<img src=x onerror=alert(1)>`" in rows[1]
    assert "``` s`q``r` ```" in rows[1]  # fence longer than any backtick run inside


def test_md_code_outside_tables_leaves_pipes_and_joins_lines():
    assert md_code("a|b\n<b>") == "`a|b <b>`"
    assert md_code("`x`") == "`` `x` ``"
