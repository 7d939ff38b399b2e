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


def test_lds_joins_on_ids_and_says_when_it_reorders(tmp_path, capsys):
    import json

    from daunce_core.perturb import lds_masks

    rng = np.random.default_rng(1)
    n, m = 40, 5
    masks = lds_masks(0, 20, n, 0.5)
    a = rng.normal(size=(n, m))
    store.write_ground_truth(tmp_path / "g.h5", masks=masks, outputs=(masks @ a)[None],
                             train_ids=np.arange(n) + 7, query_ids=np.arange(m))
    store.write_scores(tmp_path / "s.h5", scores=a, train_ids=np.arange(n) + 7,
                       query_ids=np.arange(m))
    p = rng.permutation(n)
    store.write_scores(tmp_path / "p.h5", scores=a[p], train_ids=np.arange(n)[p] + 7,
                       query_ids=np.arange(m))
    assert main(["lds", str(tmp_path / "s.h5"), str(tmp_path / "g.h5")]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["lds", str(tmp_path / "p.h5"), str(tmp_path / "g.h5")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == plain and plain["lds"] == 1.0
    assert "note:" in err and "'train_ids'" in err and "reordered" in err
    store.write_scores(tmp_path / "o.h5", scores=a, train_ids=np.arange(n) + 8,
                       query_ids=np.arange(m))
    assert main(["lds", str(tmp_path / "o.h5"), str(tmp_path / "g.h5")]) == 1
    assert "o.h5: 'train_ids' differ from" in capsys.readouterr().err


def test_options_that_would_do_nothing_are_refused(tmp_path, capsys):
    losses_file(tmp_path / "l.h5")
    args = ["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "s.h5")]
    assert main(args + ["--lambda", "0.2"]) == 2
    assert "--lambda does nothing" in capsys.readouterr().err
    assert main(args + ["--threshold", "hard"]) == 2
    assert "needs --lambda" in capsys.readouterr().err
    assert main(args + ["--memory-gb", "1e-9"]) == 1  # dense does not fit: refused, not top-k
    err = capsys.readouterr().err
    assert "--topk N" in err and "--memory-gb" in err
    assert not (tmp_path / "s.h5").exists()
    assert main(args + ["--threshold", "hard", "--lambda", "0.2"]) == 0
    assert store.read_scores(tmp_path / "s.h5")["attrs"]["lambda"] == 0.2
