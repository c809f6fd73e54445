import json

import pytest

from sparse_attention.atomic_io import atomic_open, write_json


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": [1, 2, 3]})
    assert json.loads(path.read_text()) == {"a": [1, 2, 3]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path) as file:
            file.write(b"half of the new")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_non_finite_numbers_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "results.json"
    with pytest.raises(ValueError):
        write_json(path, {"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open(tmp_path / "x", "a"):
            pass
