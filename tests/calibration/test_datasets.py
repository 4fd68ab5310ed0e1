import numpy as np
import pytest

from calibration import DataError, load_text, sample_blocks, windows
from calibration.datasets import data_dir, local_file


def test_windows_non_overlapping_score_all_but_the_first_token():
    w = windows(1000, 512, 512, 10)
    assert [(x.begin, x.end, x.scored) for x in w] == [(0, 512, 511), (512, 1000, 487)]


def test_windows_with_stride_score_only_new_tokens():
    w = windows(1000, 512, 256, 10)
    assert [(x.begin, x.end, x.scored) for x in w][:3] == [(0, 512, 511), (256, 768, 256), (512, 1000, 232)]
    assert len(w) == 3


def test_windows_respect_max():
    assert len(windows(100_000, 512, 512, 40)) == 40


def test_sample_blocks_is_seeded():
    ids = np.arange(1000)
    a, b = sample_blocks(ids, 64, 8, seed=3), sample_blocks(ids, 64, 8, seed=3)
    assert a.shape == (8, 64) and (a == b).all()
    assert not (a == sample_blocks(ids, 64, 8, seed=4)).all()
    with pytest.raises(DataError, match="fewer than one block"):
        sample_blocks(np.arange(10), 64, 1, seed=0)


def test_local_text_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("line one\nline two\n")
    assert load_text(str(f)) == "line one\nline two\n"
    f.write_text("\n \n")
    with pytest.raises(DataError, match="empty"):
        load_text(str(f))
    with pytest.raises(DataError, match="not found"):
        load_text(str(tmp_path / "b.txt"))


def test_builtin_wikitext_reads_the_shared_copy():
    folder = data_dir()
    assert folder is not None, "../shared/data is missing"
    path = local_file("wikitext-2", "valid")
    assert path == folder / "wikitext-2" / "valid.txt"
    text = load_text("wikitext-2", "test")
    assert text.startswith(" \n = Robert <unk> = \n") and len(text) > 1_000_000
    with pytest.raises(DataError, match="no split 'dev'"):
        local_file("wikitext-2", "dev")
