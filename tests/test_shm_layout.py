"""The control segment's layout docstring names every word at its real offset."""
import re

from pmaprt._shm import layout

ROW = re.compile(r"^\s+(\d+)\s+(\d+|-)\s+([A-Z][A-Z_]+)\s", re.M)


def _tables():
    doc = layout.__doc__
    parts = {}
    for title in ("Header", "Job slot", "Worker area"):
        start = doc.index(title + " (offset")
        end = doc.find("::", doc.index("::", start) + 2)
        parts[title] = ROW.findall(doc[start: end if end > 0 else len(doc)])
    return parts


def test_every_documented_offset_is_the_constant():
    rows = [r for t in _tables().values() for r in t]
    assert len(rows) > 30
    for off, _size, name in rows:
        assert getattr(layout, name) == int(off), name


def test_every_word_constant_is_documented_and_words_do_not_overlap():
    tables = _tables()
    prefix = {"Header": "H_", "Job slot": "S_", "Worker area": "W_"}
    for title, rows in tables.items():
        names = {n for _, _, n in rows}
        consts = {n for n in dir(layout) if n.startswith(prefix[title])}
        assert names == consts, title
        spans = sorted((int(o), int(s) if s != "-" else 0) for o, s, _ in rows)
        for (a, n), (b, _) in zip(spans, spans[1:]):
            assert a + n <= b, (title, a, b)
    assert int(tables["Header"][-1][0]) + 8 <= layout.HEADER_SIZE <= layout.SLOTS_OFF


def test_record_fields_match_the_struct():
    assert layout.REC.size == 4 + 4 + 8 + 8 + 4 + 4 + 4 * 8
