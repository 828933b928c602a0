import pytest

from cdal_fast.atomic import atomic_output, partial_path


def test_partial_name_keeps_format_suffixes(tmp_path):
    assert partial_path(tmp_path / "a.ome.tif").name == ".a.partial.ome.tif"
    assert partial_path(tmp_path / "m.pt2").name == ".m.partial.pt2"


def test_rename_on_success_and_cleanup_on_error(tmp_path):
    with atomic_output(tmp_path / "sub" / "x.json") as tmp:
        tmp.write_text("{}")
        assert not (tmp_path / "sub" / "x.json").exists()
    assert (tmp_path / "sub" / "x.json").read_text() == "{}"
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "y.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_outputs_get_the_usual_permissions(tmp_path, tiny_gen):
    """safetensors creates files 0600; shared output folders need what open() would give."""
    import os

    from cdal_fast.weights import save_weights

    st, cfg = save_weights(tmp_path / "w", tiny_gen)
    mask = os.umask(0o022)
    os.umask(mask)
    for p in (st, cfg):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask
