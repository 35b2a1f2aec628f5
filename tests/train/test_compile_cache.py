"""The compilation cache's folder handling: private view for TensorFlow, atomic publication, clean-up.

Real XLA runs that fill and reuse a cache are in test_engine.py; here entries are plain files.
"""
import os

import pytest

from cellavie_hpc.errors import ConfigError
from cellavie_hpc.train import compile_cache as cc


def _entry(folder, name, text="x" * 100):
    path = folder / f"xla_compile_cache__{name}__1__XLA_CPU_JIT.pb"
    path.write_text(text)
    return path


def test_export_gives_tensorflow_a_private_view_and_publish_moves_new_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")
    cache = cc.CompileCache(tmp_path / "it's a cache")
    assert cache.folder.parent == tmp_path / "it's a cache" and cache.folder.name.startswith("tf2.")
    cache.folder.mkdir(parents=True)
    old = _entry(cache.folder, "old")
    cache.export()
    assert cache.found == 1 and cache.private.parent == cache.folder
    assert os.environ["TF_XLA_FLAGS"] == f'--tf_xla_auto_jit=0 {cc.FLAG}="{cache.private}"'
    assert [p.name for p in cc.entries(cache.private)] == [old.name]
    assert (cache.private / old.name).stat().st_ino == old.stat().st_ino  # a hard link, not a copy

    new = _entry(cache.private, "new", "compiled by this process")
    assert cache.publish() == 1 and cache.publish() == 0
    assert [p.name for p in cc.entries(cache.folder)] == sorted([old.name, new.name])
    assert (cache.folder / new.name).read_text() == "compiled by this process"
    assert not list(cache.folder.glob(".*partial"))
    _entry(cache.private, "later")
    assert cache.close() == 1 and not cache.private.exists()
    assert len(cc.entries(cache.folder)) == 3


def test_bad_folders_name_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("CELLAVIE_NO_SUCH_VARIABLE", raising=False)
    with pytest.raises(ConfigError, match=r"train\.compile_cache_dir .*environment variable not set"):
        cc.CompileCache("$CELLAVIE_NO_SUCH_VARIABLE/xla")
    with pytest.raises(ConfigError, match=r"train\.compile_cache_dir .*double quote"):
        cc.CompileCache(tmp_path / 'a"b')
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"train\.compile_cache_dir: cannot create"):
        cc.CompileCache(tmp_path / "file").export()
