"""The on-disk latency table behind round_to="auto": reused across processes on the same machine
and torch version only, and never an error when its file is damaged or cannot be written."""

import json
import os
import warnings

import pytest
import torch

from pangkas import latency_table, widths

LAYER = ("linear", 8, 16, (2, 8), ())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache directory for this test, a fresh process's memory, and a counting fake measurer."""
    monkeypatch.setenv(latency_table.ENV, str(tmp_path))
    latency_table.forget()
    calls = []
    monkeypatch.setattr(widths, "_measure", lambda *layer: calls.append(layer) or 0.25)
    yield tmp_path / "latency" / "layers.json", calls
    latency_table.forget()


def new_process():
    latency_table.forget()


def test_second_process_reads_the_timing_from_disk(cache, monkeypatch):
    path, calls = cache
    assert widths._seconds(*LAYER) == 0.25
    assert widths._seconds(*LAYER) == 0.25  # memory
    assert len(calls) == 1 and path.is_file()
    new_process()
    monkeypatch.setattr(widths, "_measure", lambda *layer: pytest.fail("measured again"))
    assert widths._seconds(*LAYER) == 0.25


def test_real_layer_timing_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv(latency_table.ENV, str(tmp_path))
    latency_table.forget()
    torch.set_num_threads(1)
    try:
        measured = widths.layer_timer(torch.nn.Linear(4, 6), (1, 4))(3)
        new_process()
        monkeypatch.setattr(widths, "_measure", lambda *layer: pytest.fail("measured again"))
        assert widths.layer_timer(torch.nn.Linear(4, 6), (1, 4))(3) == measured > 0
    finally:
        latency_table.forget()


@pytest.mark.parametrize("change", ["torch", "machine", "threads"])
def test_other_machine_or_torch_does_not_reuse(cache, monkeypatch, change):
    path, calls = cache
    widths._seconds(*LAYER)
    new_process()
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1")
    elif change == "machine":
        monkeypatch.setattr(latency_table, "cpu_model", lambda: "Another CPU")
    else:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 977)
    widths._seconds(*LAYER)
    assert len(calls) == 2
    assert len(json.loads(path.read_text())["machines"]) == 2  # both kept on disk


@pytest.mark.parametrize("content", [b"\x00\xff garbage", b'{"format": 1, "machines": {"a":', b"[1, 2]",
                                     b'{"format": 1, "machines": {"m": {"k": "fast"}}}',
                                     b'{"format": 99, "machines": {}}'])
def test_damaged_file_is_ignored_with_a_warning_and_rewritten(cache, content):
    path, calls = cache
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.warns(UserWarning, match="damaged"):
        assert widths._seconds(*LAYER) == 0.25
    assert len(calls) == 1
    data = json.loads(path.read_text())
    assert latency_table._valid(data) and list(data["machines"].values()) == [{json.dumps(LAYER): 0.25}]


def test_crash_while_writing_leaves_the_previous_file(cache, monkeypatch):
    path, calls = cache
    widths._seconds(*LAYER)
    before = path.read_bytes()
    new_process()

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        widths._seconds("linear", 8, 24, (2, 8), ())
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["layers.json"]  # no temporary file left behind


def test_two_processes_merge_their_entries(cache):
    path, calls = cache
    first, second = latency_table.LatencyTable(path), latency_table.LatencyTable(path)
    first.seconds("x", lambda: 1.0)
    second.seconds("x", lambda: pytest.fail("measured again"))  # both have read the file now
    first.seconds("a", lambda: 2.0)
    second.seconds("b", lambda: 3.0)  # does not drop "a", which it never read
    entries = json.loads(path.read_text())["machines"][latency_table.machine()]
    assert entries == {"x": 1.0, "a": 2.0, "b": 3.0}


def test_cache_dir_that_is_a_file_works_in_memory_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("theirs")
    monkeypatch.setenv(latency_table.ENV, str(blocker))
    latency_table.forget()
    calls = []
    monkeypatch.setattr(widths, "_measure", lambda *layer: calls.append(layer) or 0.25)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for width in (16, 24, 16, 32):
                widths._seconds("linear", 8, width, (2, 8), ())
    finally:
        latency_table.forget()
    assert len(calls) == 3 and len(caught) == 1 and "latency cache" in str(caught[0].message)
    assert blocker.read_text() == "theirs"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_cache_works_in_memory_with_one_warning(cache):
    path, calls = cache
    path.parent.parent.chmod(0o500)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for width in (16, 24, 16, 32):
                widths._seconds("linear", 8, width, (2, 8), ())
        assert len(calls) == 3
        assert [str(w.message) for w in caught if "latency cache" in str(w.message)] != []
        assert len(caught) == 1
    finally:
        path.parent.parent.chmod(0o700)
    assert not path.parent.exists()


def test_cache_in_the_way_is_not_touched(cache):
    path, calls = cache
    path.mkdir(parents=True)  # a directory where the file would go
    (path / "theirs").write_text("keep")
    with pytest.warns(UserWarning, match="latency cache"):
        widths._seconds(*LAYER)
    assert (path / "theirs").read_text() == "keep"


def test_empty_cache_dir_keeps_timings_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv(latency_table.ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    latency_table.forget()
    calls = []
    monkeypatch.setattr(widths, "_measure", lambda *layer: calls.append(layer) or 0.25)
    try:
        widths._seconds(*LAYER)
        widths._seconds(*LAYER)
    finally:
        latency_table.forget()
    assert len(calls) == 1 and list(tmp_path.iterdir()) == []


def test_default_cache_is_in_the_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(latency_table.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert latency_table.cache_file() == tmp_path / "pangkas" / "latency" / "layers.json"
