"""Datasets beyond the paper's: torchvision classes, image folders with a manifest, .npz arrays.

Every dataset here is made by the test (PIL images, idx files, arrays); nothing is downloaded.
Each image is filled with one grey level (or one colour) of its own, so an example can be
recognised by its pixels after loading: ``ds.images`` undoes the normalisation.
"""
import csv
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daunce_core.config import DataConfig
from daunce_core.data import MANIFEST_NAME, DataError, load_dataset


def cfg(name, root, **kw):
    """A DataConfig; an image folder's manifest beside the folder (``<root>-ids.csv``), as the
    workflow keeps it beside the results, never in the folder."""
    kw.setdefault("n_train", 0)
    kw.setdefault("n_query", 0)
    if name == "imagefolder":
        kw.setdefault("manifest", str(manifest_of(root)))
    return DataConfig(name=name, root=str(root), download=False, **kw)


def write_image(path, value, size=(8, 8), mode="L"):
    """A uniform image of grey level ``value`` (RGB: value, value // 2, 255 - value); size is (H, W)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, value // 2, 255 - value)
    Image.new(mode, (size[1], size[0]), colour).save(path)


def first_channel_levels(ds, X):
    """The grey level (first channel) of each example, read back from the normalised inputs."""
    return np.rint(ds.images(X)[:, 0, 0, 0] * 255).astype(int)


def manifest_of(root):
    return Path(root).with_name(Path(root).name + "-ids.csv")


def manifest_rows(root):
    with open(manifest_of(root), newline="") as fh:
        return list(csv.reader(fh))


def levels_by_id(ds):
    return dict(zip(ds.train_ids.tolist(), zip(ds.y_train.tolist(), first_channel_levels(ds, ds.X_train))))


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# --- image folders -------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for j, cls in enumerate(["cat", "dog", "emu"]):
        for i in range(4):
            write_image(root / cls / f"{i}.png", 10 + 40 * j + i)
    return root


def test_imagefolder_grayscale_labels_ids_and_manifest(folder):
    ds = load_dataset(cfg("imagefolder", folder))
    assert ds.X_train.shape == (12, 1, 8, 8) and ds.X_train.dtype == np.float32
    assert ds.classes == ["cat", "dog", "emu"] and ds.num_classes == 3
    order = np.argsort(ds.train_ids)
    assert ds.train_ids[order].tolist() == list(range(12))  # sorted paths on first use
    assert ds.y_train[order].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert first_channel_levels(ds, ds.X_train)[order].tolist() == [10 + 40 * j + i for j in range(3) for i in range(4)]
    np.testing.assert_allclose(ds.X_train.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(ds.X_train.std(), 1, atol=1e-4)
    rows = manifest_rows(folder)
    assert rows[0] == ["id", "path"] and rows[1] == ["0", "cat/0.png"] and rows[12] == ["11", "emu/3.png"]


def test_imagefolder_split_is_seeded_like_digits(folder):
    a = load_dataset(cfg("imagefolder", folder, n_train=8, n_query=3, split_seed=1))
    b = load_dataset(cfg("imagefolder", folder, n_train=8, n_query=3, split_seed=1))
    c = load_dataset(cfg("imagefolder", folder, n_train=8, n_query=3, split_seed=2))
    assert a.train_ids.tolist() == b.train_ids.tolist() and a.query_ids.tolist() == b.query_ids.tolist()
    assert a.train_ids.tolist() != c.train_ids.tolist()
    assert not set(a.train_ids) & set(a.query_ids) and (a.n, a.m) == (8, 3)


def test_adding_files_never_renumbers(folder):
    before = load_dataset(cfg("imagefolder", folder))
    old = levels_by_id(before)
    old_rows = manifest_rows(folder)
    write_image(folder / "cat" / "0a.png", 200)     # sorts between existing files
    write_image(folder / "ant" / "0.png", 210)      # a new class sorting first
    (folder / "dog" / "2.png").unlink()             # a file gone: its id stays unused
    after = load_dataset(cfg("imagefolder", folder))
    new = levels_by_id(after)
    assert {k: v for k, v in old.items() if k != 6} == {k: new[k] for k in old if k != 6}
    assert 6 not in new  # dog/2.png had id 6
    assert new[12] == (3, 210) and new[13] == (0, 200)  # appended in path order; 'ant' is the fourth class
    assert after.classes == ["cat", "dog", "emu", "ant"]
    rows = manifest_rows(folder)
    assert rows[:13] == old_rows and rows[13:] == [["12", "ant/0.png"], ["13", "cat/0a.png"]]
    write_image(folder / "dog" / "2.png", 99)        # back again: its old id
    again = load_dataset(cfg("imagefolder", folder))
    assert 6 in again.train_ids.tolist() and len(manifest_rows(folder)) == 15


def test_imagefolder_mixed_modes_become_rgb(tmp_path):
    write_image(tmp_path / "a" / "0.png", 30, mode="L")
    write_image(tmp_path / "b" / "0.png", 100, mode="RGB")
    write_image(tmp_path / "b" / "1.png", 120, mode="RGBA")
    ds = load_dataset(cfg("imagefolder", tmp_path))
    assert ds.X_train.shape == (3, 3, 8, 8) and ds.mean.shape == (3,)
    img = ds.images(ds.X_train)[np.argsort(ds.train_ids)][:, 0, 0]  # [N, C]
    np.testing.assert_allclose(np.rint(img * 255), [[30, 30, 30], [100, 50, 155], [120, 60, 135]])


def test_imagefolder_two_sizes_need_image_size(tmp_path):
    write_image(tmp_path / "a" / "0.png", 30, size=(8, 8))
    write_image(tmp_path / "b" / "0.png", 90, size=(12, 10), mode="RGB")
    with pytest.raises(DataError, match=r"is 8x8 .* is 12x10; set data.image_size") as e:
        load_dataset(cfg("imagefolder", tmp_path))
    one_line_error(e)
    ds = load_dataset(cfg("imagefolder", tmp_path, image_size=[6, 5]))
    assert ds.X_train.shape == (2, 3, 6, 5)
    assert load_dataset(cfg("imagefolder", tmp_path, image_size=16)).X_train.shape == (2, 3, 16, 16)


def test_imagefolder_train_and_test_subfolders(tmp_path):
    for split, k in (("train", 3), ("test", 2)):
        for j, cls in enumerate(["x", "y"]):
            for i in range(k):
                write_image(tmp_path / split / cls / f"{i}.png", 50 * j + i + (100 if split == "test" else 0),
                            size=(5, 7), mode="RGB")
    ds = load_dataset(cfg("imagefolder", tmp_path, n_train=4))
    assert ds.classes == ["x", "y"] and ds.X_train.shape == (4, 3, 5, 7) and ds.X_query.shape == (4, 3, 5, 7)
    assert ds.train_ids.tolist() == [0, 1, 2, 3] and ds.y_train.tolist() == [0, 0, 0, 1]  # the first four ids
    assert ds.query_ids.tolist() == [6, 7, 8, 9] and ds.y_query.tolist() == [0, 0, 1, 1]
    assert first_channel_levels(ds, ds.X_query).tolist() == [100, 101, 150, 151]


def test_imagefolder_manifest_elsewhere(folder, tmp_path):
    where = tmp_path / "meta" / "ids.csv"
    load_dataset(cfg("imagefolder", folder, manifest=str(where)))
    assert where.exists() and not (folder / MANIFEST_NAME).exists()


@pytest.mark.parametrize("make, pattern", [
    (lambda r: None, r"data.root: .*missing is not a folder"),
    (lambda r: write_image(r / "0.png", 1), r"data.root: .*0.png lies directly in .*layout is .*<class>/<image>"),
    (lambda r: (r / "cls").mkdir(parents=True), r"data.root: no images in sub-folders of"),
    (lambda r: (write_image(r / "c" / "0.png", 1), (r / MANIFEST_NAME).write_text("a,b\n")),
     r"data.manifest: .* does not start with the header 'id,path'"),
    (lambda r: (write_image(r / "c" / "0.png", 1), (r / MANIFEST_NAME).write_text("id,path\nx,c/0.png\n")),
     r"data.manifest: .*:2: expected 'id,path'"),
    (lambda r: ((r / "c").mkdir(parents=True), (r / "c" / "0.png").write_bytes(b"not an image")),
     r"0.png: cannot read the image"),
])
def test_imagefolder_bad_inputs(tmp_path, make, pattern):
    root = tmp_path / "missing"
    make(root)
    with pytest.raises(DataError, match=pattern) as e:
        load_dataset(cfg("imagefolder", root))
    one_line_error(e)


def test_too_many_examples_asked(folder):
    with pytest.raises(DataError, match=r"data.n_train=20 but only 12"):
        load_dataset(cfg("imagefolder", folder, n_train=20))


# --- .npz arrays ---------------------------------------------------------------------------------

def arrays(**over):
    rng = np.random.default_rng(0)
    a = dict(X_train=rng.integers(0, 256, (10, 6, 5), dtype=np.uint8), y_train=np.arange(10) % 3,
             X_query=rng.integers(0, 256, (4, 6, 5), dtype=np.uint8), y_query=np.array([0, 1, 2, 1]))
    a.update(over)
    return {k: v for k, v in a.items() if v is not None}


def test_npz_grayscale_uint8(tmp_path):
    a = arrays()
    np.savez(tmp_path / "d.npz", **a)
    ds = load_dataset(cfg("npz", tmp_path / "d.npz", n_train=8))
    assert ds.X_train.shape == (8, 1, 6, 5) and ds.X_query.shape == (4, 1, 6, 5)
    assert ds.num_classes == 3 and ds.train_ids.tolist() == list(range(8))
    np.testing.assert_allclose(ds.images(ds.X_train)[..., 0], a["X_train"][:8] / 255.0, atol=1e-6)
    np.testing.assert_allclose(ds.images(ds.X_query)[..., 0], a["X_query"] / 255.0, atol=1e-6)


def test_npz_colour_float_with_ids_and_classes(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.random((6, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", X_train=X, y_train=np.array([0, 1, 0, 1, 0, 3]), X_query=X[:2],
             y_query=np.array([1, 0]), train_ids=np.array([50, 10, 20, 30, 40, 60]), query_ids=np.array([7, 3]),
             classes=np.array(["a", "b", "c", "d"]))
    ds = load_dataset(cfg("npz", tmp_path / "d.npz"))
    assert ds.train_ids.tolist() == [50, 10, 20, 30, 40, 60] and ds.query_ids.tolist() == [7, 3]
    assert ds.classes == ["a", "b", "c", "d"] and ds.num_classes == 4
    np.testing.assert_allclose(ds.X_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(ds.images(ds.X_train), X.transpose(0, 2, 3, 1), atol=1e-5)


@pytest.mark.parametrize("over, pattern", [
    (dict(y_query=None), r"d.npz: missing array\(s\) y_query"),
    (dict(y_train=np.arange(9) % 3), r"d.npz: y_train has shape \(9,\) but X_train has 10 rows"),
    (dict(X_query=np.zeros((4, 6, 6), np.uint8)), r"d.npz: X_train examples have shape \(1, 6, 5\) but X_query's"),
    (dict(X_train=np.zeros((10, 1, 2, 6, 5), np.uint8)),
     r"d.npz: X_train has shape \(10, 1, 2, 6, 5\) .* expected numbers of shape .* or \[n, d\] \(feature vectors\)"),
    (dict(X_train=np.zeros((10, 30), np.uint8)), r"d.npz: X_train examples have shape \(30,\) but X_query's have"),
    (dict(y_query=np.array([0, 1, -1, 1])), r"d.npz: y_query label -1 is out of range \[0, 3\) \(row 2\)"),
    (dict(y_train=np.arange(10) % 3, classes=np.array(["a", "b"])), r"d.npz: y_train label 2 is out of range \[0, 2\)"),
    (dict(y_train=np.linspace(0, 1, 10)), r"d.npz: y_train holds float64 values; expected integer class labels"),
    (dict(train_ids=np.zeros(10, int)), r"d.npz: train_ids must be 10 distinct integers"),
    # audit 2, finding 5: one NaN made every normalised example NaN; uint64 ids wrapped to negative
    (dict(X_train=np.where(np.arange(10)[:, None, None] == 3, np.nan, np.ones((10, 6, 5)))),
     r"d.npz: X_train row 3 holds a NaN or infinite value \(or one beyond float32's range\); fix or drop that row"),
    (dict(X_query=np.full((4, 6, 5), np.inf, np.float32)), r"d.npz: X_query row 0 holds a NaN or infinite value"),
    (dict(X_train=np.where(np.arange(10)[:, None, None] == 7, 1e300, np.ones((10, 6, 5)))),
     r"d.npz: X_train row 7 holds a NaN or infinite value \(or one beyond float32's range\)"),
    (dict(X_train=np.ones((10, 6, 5), np.complex64)), r"d.npz: X_train has shape \(10, 6, 5\) and dtype complex64"),
    (dict(X_train=np.ones((0, 6, 5)), y_train=np.zeros(0, int)), r"d.npz: X_train has no rows"),
    (dict(X_query=np.ones((0, 6, 5)), y_query=np.zeros(0, int)), r"d.npz: X_query has no rows; daunce needs query"),
    (dict(train_ids=np.arange(10, dtype=np.uint64) + 2**63),
     r"d.npz: train_ids holds uint64 value 9223372036854775808, beyond int64 \(max 9223372036854775807\)"),
])
def test_npz_bad_inputs(tmp_path, over, pattern):
    np.savez(tmp_path / "d.npz", **arrays(**over))
    with pytest.raises(DataError, match=pattern) as e:
        load_dataset(cfg("npz", tmp_path / "d.npz"))
    one_line_error(e)


def test_npz_nan_rows_beyond_n_train_are_not_read(tmp_path):
    X = np.ones((10, 6, 5))
    X[9] = np.nan
    np.savez(tmp_path / "d.npz", **arrays(X_train=X))
    assert np.isfinite(load_dataset(cfg("npz", tmp_path / "d.npz", n_train=9)).X_train).all()


def test_npz_unambiguous_channels_last_is_transposed_with_a_warning(tmp_path, caplog):
    """[n, H, W, C] with C 1 or 3 and H, W > 4 cannot be channels first (C = H > 4 channels of
    W <= 3 pixels); it was read as such without a word (audit 2, finding 5)."""
    rng = np.random.default_rng(2)
    X = rng.random((10, 6, 5, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", **arrays(X_train=X, X_query=X[:4]))
    with caplog.at_level("WARNING", logger="daunce_core.data"):
        ds = load_dataset(cfg("npz", tmp_path / "d.npz"))
    assert ds.X_train.shape == (10, 3, 6, 5) and ds.X_query.shape == (4, 3, 6, 5)
    np.testing.assert_allclose(ds.images(ds.X_train), X, atol=1e-5)
    assert "X_train and X_query of shape [n, 6, 5, 3] read as channels last" in caplog.text
    # ambiguous shapes stay channels first, as documented
    np.savez(tmp_path / "e.npz", **arrays(X_train=X[:, :4, :4], X_query=X[:4, :4, :4]))
    assert load_dataset(cfg("npz", tmp_path / "e.npz")).X_train.shape == (10, 4, 4, 3)


def test_npz_missing_or_unreadable_file(tmp_path):
    with pytest.raises(DataError, match=r"data.root: .*nope.npz is not a file"):
        load_dataset(cfg("npz", tmp_path / "nope.npz"))
    (tmp_path / "bad.npz").write_text("no zip")
    with pytest.raises(DataError, match=r"bad.npz: cannot read as .npz"):
        load_dataset(cfg("npz", tmp_path / "bad.npz"))


# --- torchvision classes -------------------------------------------------------------------------

def write_idx(path, array):
    """The idx format of (Fashion-)MNIST: magic 0x0000 08 <ndim>, big-endian int32 sizes, uint8 data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_fashion_mnist_from_hand_written_idx_files(tmp_path):
    rng = np.random.default_rng(2)
    raw = tmp_path / "FashionMNIST" / "raw"
    images = {s: rng.integers(0, 256, (k, 7, 6), dtype=np.uint8) for s, k in (("train", 9), ("t10k", 5))}
    labels = {"train": np.arange(9) % 10, "t10k": np.array([9, 0, 3, 3, 1])}
    for s, pixels in images.items():
        write_idx(raw / f"{s}-images-idx3-ubyte", pixels)
        write_idx(raw / f"{s}-labels-idx1-ubyte", labels[s])
    ds = load_dataset(cfg("FashionMNIST", tmp_path, n_train=6))
    assert ds.X_train.shape == (6, 1, 7, 6) and ds.X_query.shape == (5, 1, 7, 6)
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10
    assert ds.train_ids.tolist() == list(range(6)) and ds.query_ids.tolist() == list(range(5))
    assert ds.y_train.tolist() == labels["train"][:6].tolist() and ds.y_query.tolist() == labels["t10k"].tolist()
    np.testing.assert_allclose(ds.images(ds.X_train)[..., 0], images["train"][:6] / 255.0, atol=1e-6)


def test_split_keyword_datasets(tmp_path, monkeypatch):
    """Classes that take split='train'/'test' (SVHN, STL10, ...) load the same way."""
    import torchvision
    from torchvision.datasets import VisionDataset

    seen = []

    class SplitSet(VisionDataset):
        def __init__(self, root, split="train", download=False):
            super().__init__(root)
            seen.append((split, download))
            self.values = [5, 6, 7] if split == "train" else [8, 9]

        def __len__(self):
            return len(self.values)

        def __getitem__(self, i):
            return Image.new("RGB", (4, 3), (self.values[i], 0, 0)), i % 2

    monkeypatch.setattr(torchvision.datasets, "SplitSet", SplitSet, raising=False)
    ds = load_dataset(cfg("SplitSet", tmp_path))
    assert seen == [("train", False), ("test", False)]
    assert ds.X_train.shape == (3, 3, 3, 4) and ds.classes == ["0", "1"] and ds.y_query.tolist() == [0, 1]
    assert first_channel_levels(ds, ds.X_query).tolist() == [8, 9]


def test_torchvision_offline_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"^FashionMNIST is not under .* could not be downloaded .*RuntimeError") as e:
        load_dataset(cfg("FashionMNIST", tmp_path))
    one_line_error(e)


@pytest.mark.parametrize("name, pattern", [
    ("ImageFolder", r"data.name: torchvision.datasets.ImageFolder takes neither train= nor split="),
    ("NoSuchSet", r"data.name: unknown dataset 'NoSuchSet'; choose 'digits', 'cifar10', 'fashion_mnist' \(offline\), "
                  r"'imagefolder', 'npz'"),
    ("folder:x", r"data.name: unknown dataset 'folder:x'"),
])
def test_unknown_or_unsupported_names(tmp_path, name, pattern):
    with pytest.raises(DataError, match=pattern) as e:
        load_dataset(cfg(name, tmp_path))
    one_line_error(e)


# --- the recorded split: ids and a hash of the data (audit 2, finding 2) --------------------------

def experiment(data_cfg):
    from daunce_core.config import ExperimentConfig

    c = ExperimentConfig()
    c.data = data_cfg
    return c


@pytest.mark.parametrize("change", ["labels", "pixels"])
def test_npz_replaced_under_the_same_ids_is_refused_by_the_recorded_split(tmp_path, change):
    """Rewriting the npz with other labels (or inputs) and the same ids was never noticed: the
    steps paired results of fits on the old data with the new."""
    from daunce_core import store
    from daunce_core.steps import vision as pipeline

    a = arrays(train_ids=np.arange(10) + 100)
    np.savez(tmp_path / "d.npz", **a)
    c = experiment(cfg("npz", tmp_path / "d.npz"))
    split = tmp_path / "results" / "exp" / "data" / "split.npz"
    ds = pipeline.prepare_data(c, split)
    assert pipeline.load_checked(c, split).content_hash == ds.content_hash != ""
    if change == "labels":
        a["y_train"] = (a["y_train"] + 1) % 3
    else:
        a["X_train"] = a["X_train"].copy()
        a["X_train"][4, 0, 0] ^= 1
    np.savez(tmp_path / "d.npz", **a)
    data, results = re.escape(str(tmp_path / "d.npz")), re.escape(str(tmp_path / "results" / "exp"))
    with pytest.raises(store.StoreError, match=rf"split.npz: the data read from {data} changed since this split "
                       rf"was recorded .*; delete {results} and rerun$") as e:
        pipeline.load_checked(c, split)
    one_line_error(e)


def test_a_split_recorded_without_the_hash_is_checked_on_ids_alone(tmp_path):
    from daunce_core import store
    from daunce_core.steps import vision as pipeline

    np.savez(tmp_path / "d.npz", **arrays())
    c = experiment(cfg("npz", tmp_path / "d.npz"))
    ds = pipeline.load_checked(c)
    np.savez(tmp_path / "old.npz", train_ids=ds.train_ids, query_ids=ds.query_ids, y_train=ds.y_train,
             y_query=ds.y_query)  # the layout before the hash
    pipeline.load_checked(c, tmp_path / "old.npz")
    np.savez(tmp_path / "old.npz", train_ids=ds.train_ids[::-1], query_ids=ds.query_ids)
    with pytest.raises(store.StoreError, match="the recorded split differs"):
        pipeline.load_checked(c, tmp_path / "old.npz")


def test_an_image_replaced_in_the_folder_changes_the_content_hash(folder):
    before = load_dataset(cfg("imagefolder", folder))
    assert load_dataset(cfg("imagefolder", folder)).content_hash == before.content_hash
    write_image(folder / "dog" / "2.png", 200)
    after = load_dataset(cfg("imagefolder", folder))
    assert after.train_ids.tolist() == before.train_ids.tolist() and after.content_hash != before.content_hash
    assert load_dataset(cfg("imagefolder", folder, image_size=4)).content_hash != after.content_hash
