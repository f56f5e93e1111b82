"""The demo only ever works in a folder it owns."""

from __future__ import annotations

import pytest

from testbed.demo import DEMO_MARKER, _prepare_data_dir


def test_demo_refuses_a_folder_it_did_not_make_and_leaves_it_untouched(tmp_path):
    (tmp_path / "thesis.txt").write_text("precious")

    with pytest.raises(SystemExit, match="not empty and was not made by the demo"):
        _prepare_data_dir(tmp_path)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["thesis.txt"]


def test_demo_empties_only_a_folder_an_earlier_demo_made(tmp_path):
    data_dir = tmp_path / "demo"
    _prepare_data_dir(data_dir)
    (data_dir / "parkmon.db").write_bytes(b"old run")

    _prepare_data_dir(data_dir)

    assert sorted(path.name for path in data_dir.iterdir()) == [DEMO_MARKER]
