"""Files bertrt writes get the mode a plain open() would give them (0666 less the umask), not
tempfile's private 0600: a model saved on a shared machine is readable by the group."""

from __future__ import annotations

import os
import stat

import pytest

import bertrt
from bertrt.fileio import atomic_write_text, temp_dir


@pytest.fixture(params=[0o022, 0o027])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_saved_model_and_export_respect_the_umask(tmp_path, mask):
    model = bertrt.Model.from_config(bertrt.BertConfig.preset("tiny", vocab_size=50),
                                     head="none")
    model.save(tmp_path / "m")
    path = model.export_onnx(tmp_path / "m.onnx", flavour="standard")
    files = sorted((tmp_path / "m").iterdir()) + [path]
    assert files
    for f in files:
        assert _mode(f) == 0o666 & ~mask, f.name
    assert _mode(tmp_path / "m") == 0o777 & ~mask


def test_text_and_temp_dirs(tmp_path, mask):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == _mode(plain)
    made = tmp_path / "made"
    made.mkdir()
    assert _mode(temp_dir(tmp_path, ".t.")) == _mode(made)
