"""The ``daunce`` command line on files made here."""
import numpy as np

from daunce_core import store
from daunce_core.cli import main


def losses_file(path):
    rng = np.random.default_rng(0)
    store.write_losses(path, store.Losses(rng.normal(size=(20, 30)).astype(np.float32),
                                          rng.normal(size=(20, 4)).astype(np.float32), np.arange(20),
                                          np.arange(30) + 1000, np.arange(4), {"variant": "daunce"}))


def test_score_command_writes_dense_and_topk(tmp_path, capsys):
    losses_file(tmp_path / "l.h5")
    assert main(["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "s.h5")]) == 0
    dense, meta = store.dense_scores(tmp_path / "s.h5")
    L = store.read_losses(tmp_path / "l.h5")
    ref = np.corrcoef(np.concatenate([L.train, L.query], 1).T)[:30, 30:]
    np.testing.assert_allclose(dense, ref, rtol=1e-5, atol=1e-6)
    assert main(["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "k.h5"), "--topk", "3",
                 "--measure", "covariance"]) == 0
    s = store.read_scores(tmp_path / "k.h5")
    assert s["format"] == "topk" and s["indices"].shape == (4, 3)
    assert main(["info", str(tmp_path / "k.h5")]) == 0
    assert "indices" in capsys.readouterr().out


def test_score_command_on_a_bad_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "bad.h5").write_bytes(b"not hdf5 at all")
    assert main(["score", str(tmp_path / "bad.h5"), "-o", str(tmp_path / "s.h5")]) == 1
    err = capsys.readouterr().err
    assert "bad.h5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.h5").exists()
