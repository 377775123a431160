"""Tests of lipcert.data: every format is written here in tmp_path and read back pixel for pixel."""

from __future__ import annotations

import hashlib
import io
import pickle
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lipcert.data import Labels, check_fits, open_dataset
from lipcert.data.base import DatasetInfo
from lipcert.errors import DataError, LipcertError

from .conftest import RNG, u8, write_cifar10, write_idx, write_images

# ---------------------------------------------------------------- helpers writing each format


def scaled(x: np.ndarray) -> np.ndarray:
    """What lipcert must deliver for uint8-range pixels."""
    return x.astype(np.float32) / np.float32(255)


def read_all(ds, batch_size: int = 4, **kw) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*ds.batches(batch_size, **kw))
    return np.concatenate(xs), np.concatenate(ys)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_mnist(root: Path, gz: bool, n_test: int = 9, n_train: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root.mkdir(exist_ok=True)
    ext = ".gz" if gz else ""
    out = {}
    for prefix, n in (("t10k", n_test), ("train", n_train)):
        x, y = u8(n, 28, 28), RNG.integers(0, 10, n).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", y)
        out[prefix] = (x, y)
    return out


def smooth(h: int, w: int) -> np.ndarray:
    """An RGB gradient, which JPEG reproduces closely."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], axis=-1).astype(np.uint8)


def message(exc_info: pytest.ExceptionInfo) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- npz


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_nhwc_uint8(tmp_path: Path, save) -> None:
    x, y = u8(10, 8, 6, 3), np.arange(10) % 4
    path = tmp_path / "d.npz"
    save(path, x=x, y=y)
    ds = open_dataset(path)
    info = ds.info
    assert (info.format, info.num_samples, info.sample_shape) == ("npz", 10, (3, 8, 6))
    assert (info.layout, info.value_range, info.num_classes) == ("NHWC", "uint8 0-255", 4)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    got_x, got_y = read_all(ds)
    assert got_x.dtype == np.float32 and got_y.dtype == np.int64
    assert np.array_equal(got_x, scaled(x.transpose(0, 3, 1, 2))) and np.array_equal(got_y, y)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_nchw_float(tmp_path: Path, save) -> None:
    x, y = RNG.random((7, 3, 5, 5)), np.array([0, 1, 2, 2, 1, 0, 1], dtype=np.int32)
    save(tmp_path / "d.npz", x=x, y=y)
    ds = open_dataset(tmp_path / "d.npz")
    assert (ds.info.layout, ds.info.value_range, ds.info.sample_shape) == ("NCHW", "float 0-1", (3, 5, 5))
    got_x, got_y = read_all(ds, 3)
    assert np.array_equal(got_x, x.astype(np.float32)) and np.array_equal(got_y, y)


def test_npz_ranks_and_key_names(tmp_path: Path) -> None:
    x3 = u8(5, 4, 4)
    np.savez(tmp_path / "gray.npz", images=x3, labels=np.arange(5)[:, None])  # (N, 1) labels are accepted
    ds = open_dataset(tmp_path / "gray.npz")
    assert (ds.info.layout, ds.info.sample_shape) == ("NHW", (1, 4, 4))
    assert np.array_equal(read_all(ds)[0], scaled(x3[:, None]))
    np.savez(tmp_path / "keras.npz", x_train=u8(3, 4), y_train=np.zeros(3), x_test=u8(2, 4), y_test=np.ones(2))
    for split, n in (("test", 2), ("train", 3)):
        ds = open_dataset(tmp_path / "keras.npz", split=split)
        assert (ds.info.num_samples, ds.info.layout, ds.info.sample_shape) == (n, "NC", (4,))


def test_layout_and_value_range_flags(tmp_path: Path) -> None:
    x = u8(4, 3, 5, 3)  # ambiguous: read as NCHW unless told otherwise
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(4, np.int64))
    assert open_dataset(tmp_path / "d.npz").info.sample_shape == (3, 5, 3)
    ds = open_dataset(tmp_path / "d.npz", layout="NHWC")
    assert (ds.info.layout, ds.info.sample_shape) == ("NHWC", (3, 3, 5))
    assert np.array_equal(read_all(ds)[0], scaled(x.transpose(0, 3, 1, 2)))
    f = RNG.random((4, 2)) * 255  # floats above 1: taken as 0-255
    np.savez(tmp_path / "f.npz", x=f, y=np.zeros(4, np.int64))
    ds = open_dataset(tmp_path / "f.npz")
    assert ds.info.value_range == "uint8 0-255"
    assert np.array_equal(read_all(ds)[0], f.astype(np.float32) / np.float32(255))
    small = RNG.random((4, 2)).astype(np.float32)
    np.savez(tmp_path / "s.npz", x=small, y=np.zeros(4, np.int64))
    ds = open_dataset(tmp_path / "s.npz", value_range="0-255")
    assert ds.info.value_range == "uint8 0-255"
    assert np.array_equal(read_all(ds)[0], small / np.float32(255))
    mask = np.array([[0, 1], [1, 1], [0, 5]], np.uint8)
    np.savez(tmp_path / "m.npz", x=mask, y=np.zeros(3, np.int64))
    ds = open_dataset(tmp_path / "m.npz", value_range="0-1")
    assert ds.info.value_range == "float 0-1"
    assert np.array_equal(next(ds.batches(2))[0], mask[:2].astype(np.float32))
    with pytest.raises(DataError, match=r"sample 2: x has values in \[0, 5\], outside the float range \[0, 1\]"):
        list(ds.batches(2))
    with pytest.raises(DataError, match="needs 4-D x"):
        open_dataset(tmp_path / "s.npz", layout="NHWC")
    with pytest.raises(DataError, match="unknown layout"):
        open_dataset(tmp_path / "s.npz", layout="CHW")


def test_batching_start_stop(tmp_path: Path) -> None:
    x, y = u8(11, 2, 2), np.arange(11)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=y)
    ds = open_dataset(tmp_path / "d.npz")
    assert [len(b[1]) for b in ds.batches(4)] == [4, 4, 3]
    got_x, got_y = read_all(ds, 3, start=2, stop=9)
    assert np.array_equal(got_y, y[2:9]) and np.array_equal(got_x, scaled(x[2:9, None]))
    assert [len(b[1]) for b in ds.batches(3, start=2, stop=9)] == [3, 3, 1]
    assert np.array_equal(read_all(ds, 5, start=8, stop=100)[1], y[8:])
    assert list(ds.batches(2, start=20)) == []
    assert np.array_equal(np.concatenate(list(ds.labels(start=1, chunk_size=4))), y[1:])
    with pytest.raises(DataError, match="batch size"):
        next(ds.batches(0))


def test_bad_values_name_the_sample(tmp_path: Path) -> None:
    x = RNG.random((6, 3)).astype(np.float32)
    x[4, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(6, np.int64))
    with pytest.raises(DataError, match="sample 4: x contains NaN or Inf") as exc:
        open_dataset(tmp_path / "nan.npz")  # the open-time range scan finds it
    assert message(exc).startswith(str(tmp_path / "nan.npz"))
    ds = open_dataset(tmp_path / "nan.npz", value_range="0-1")
    with pytest.raises(DataError, match="sample 4: x contains NaN or Inf"):
        list(ds.batches(2))
    big = np.zeros((5, 2), np.int32)
    big[3, 0] = 300
    np.savez(tmp_path / "big.npz", x=big, y=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"sample 3: x has values in \[0, 300\]"):
        list(open_dataset(tmp_path / "big.npz").batches(2))
    neg = np.array([[0.5, 0.2], [-0.5, 0.3], [0.1, -0.1]])
    np.savez(tmp_path / "neg.npz", x=neg, y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="sample 1: .*not normalized"):
        open_dataset(tmp_path / "neg.npz")


# ---------------------------------------------------------------- safetensors


def test_safetensors(tmp_path: Path) -> None:
    x, y = u8(9, 4, 4, 1), RNG.integers(0, 3, 9)
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    ds = open_dataset(tmp_path / "d.safetensors")
    assert (ds.info.format, ds.info.layout, ds.info.sample_shape) == ("safetensors", "NHWC", (1, 4, 4))
    got_x, got_y = read_all(ds, 4, start=1)
    assert np.array_equal(got_x, scaled(x[1:].transpose(0, 3, 1, 2))) and np.array_equal(got_y, y[1:])
    f = RNG.random((5, 3, 2, 2)).astype(np.float32)
    save_file({"images": f, "labels": np.arange(5)}, str(tmp_path / "f.safetensors"))
    ds = open_dataset(tmp_path / "f.safetensors")
    assert (ds.info.value_range, ds.info.num_classes) == ("float 0-1", 5)
    assert np.array_equal(read_all(ds)[0], f)


def test_safetensors_errors(tmp_path: Path) -> None:
    save_file({"pixels": u8(2, 3), "y": np.zeros(2, np.int64)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(DataError, match="the file holds: pixels, y"):
        open_dataset(tmp_path / "k.safetensors")
    data = (tmp_path / "k.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(DataError, match="not a readable .safetensors file"):
        open_dataset(tmp_path / "cut.safetensors")


# ---------------------------------------------------------------- CIFAR


def test_cifar10_test_and_train(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path / "cifar-10-batches-py")
    ds = open_dataset(tmp_path / "cifar-10-batches-py")
    data, labels = batches["test_batch"]
    assert (ds.info.format, ds.info.num_samples, ds.info.sample_shape) == ("cifar", 7, (3, 32, 32))
    assert (ds.info.layout, ds.info.value_range, ds.info.num_classes) == ("NCHW", "uint8 0-255", 10)
    got_x, got_y = read_all(ds, 3)
    assert np.array_equal(got_x, scaled(data.reshape(7, 3, 32, 32))) and np.array_equal(got_y, labels)
    train = open_dataset(tmp_path / "cifar-10-batches-py", split="train")
    data = np.concatenate([batches["data_batch_1"][0], batches["data_batch_2"][0]]).reshape(10, 3, 32, 32)
    labels = np.concatenate([batches["data_batch_1"][1], batches["data_batch_2"][1]])
    got_x, got_y = read_all(train, 4, start=3, stop=9)  # batches that straddle the two batch files
    assert np.array_equal(got_x, scaled(data[3:9])) and np.array_equal(got_y, labels[3:9])
    assert train.info.sha256 != ds.info.sha256


def test_cifar100(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"c%d" % i for i in range(100)],
                     b"coarse_label_names": [b"s%d" % i for i in range(20)]}, f, protocol=2)
    for name, n in (("train", 6), ("test", 4)):
        data = u8(n, 3072)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": list(range(90, 90 + n)), b"coarse_labels": [1] * n}, f,
                        protocol=2)
    ds = open_dataset(root)
    assert (ds.info.num_samples, ds.info.num_classes) == (4, 100)
    got_x, got_y = read_all(ds)
    assert np.array_equal(got_x, scaled(data.reshape(4, 3, 32, 32))) and list(got_y) == [90, 91, 92, 93]
    assert open_dataset(root, split="train").info.num_samples == 6


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_cifar_refuses_code(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    root.mkdir()
    marker = tmp_path / "pwned"
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": u8(2, 3072), b"labels": Evil(marker)}, f, protocol=2)
    with pytest.raises(DataError, match=r"refers to (posix|os|nt)\.system, which is not allowed") as exc:
        open_dataset(root)
    assert message(exc).startswith(str(root / "test_batch"))
    assert not marker.exists()


def test_cifar_errors(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "c")
    raw = (tmp_path / "c" / "test_batch").read_bytes()
    (tmp_path / "c" / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="not a readable CIFAR pickle"):
        open_dataset(tmp_path / "c")
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"data": u8(3, 3072), b"labels": [1, 2]}, f, protocol=2)
    with pytest.raises(DataError, match="3 images but labels of shape"):
        open_dataset(tmp_path / "c")
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"pixels": u8(3, 3072)}, f, protocol=2)
    with pytest.raises(DataError, match="the batch holds: pixels"):
        open_dataset(tmp_path / "c")


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path / "mnist", gz)
    ext = ".gz" if gz else ""
    x, y = arrays["t10k"]
    for path in (tmp_path / "mnist", tmp_path / "mnist" / f"t10k-images-idx3-ubyte{ext}",
                 tmp_path / "mnist" / f"t10k-labels-idx1-ubyte{ext}"):
        ds = open_dataset(path)
        assert (ds.info.format, ds.info.num_samples, ds.info.sample_shape) == ("idx", 9, (1, 28, 28))
        assert (ds.info.layout, ds.info.value_range) == ("NHW", "uint8 0-255")
        got_x, got_y = read_all(ds, 4)
        assert np.array_equal(got_x, scaled(x[:, None])) and np.array_equal(got_y, y)
    train = open_dataset(tmp_path / "mnist", split="train")
    got_x, got_y = read_all(train, 4, start=2, stop=5)
    assert np.array_equal(got_x, scaled(arrays["train"][0][2:5, None]))
    assert np.array_equal(got_y, arrays["train"][1][2:5])


def test_idx_float_and_errors(tmp_path: Path) -> None:
    x = RNG.random((4, 3, 3)).astype(np.float32)
    write_idx(tmp_path / "f-images-idx3-ubyte", x, code=0x0D)
    write_idx(tmp_path / "f-labels-idx1-ubyte", np.arange(3, dtype=np.uint8))
    with pytest.raises(DataError, match="x holds 4 samples but y holds 3 labels"):
        open_dataset(tmp_path / "f-images-idx3-ubyte")
    write_idx(tmp_path / "f-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    ds = open_dataset(tmp_path / "f-images-idx3-ubyte")
    assert ds.info.value_range == "float 0-1" and np.array_equal(read_all(ds)[0], x[:, None])
    write_mnist(tmp_path / "m", gz=False)
    images = tmp_path / "m" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as exc:
        open_dataset(tmp_path / "m")
    assert message(exc).startswith(str(images))
    write_mnist(tmp_path / "g", gz=True)
    images = tmp_path / "g" / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-200])
    ds = open_dataset(tmp_path / "g")  # a gzip stream is only known to be cut when it is read
    with pytest.raises(DataError, match="truncated"):
        list(ds.batches(4))
    (tmp_path / "g" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no matching labels file"):
        open_dataset(tmp_path / "g")


# ---------------------------------------------------------------- image folder


def test_image_folder_png_and_jpeg(tmp_path: Path) -> None:
    a, b, c = u8(16, 12, 3), u8(16, 12, 3), smooth(16, 12)
    write_images(tmp_path / "imgs", {"zebra": [("1.png", a)], "ant": [("b.png", b), ("a.jpg", c)],
                                     ".ipynb_checkpoints": [("x.png", a)]})
    (tmp_path / "imgs" / "ant" / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path / "imgs")
    assert (ds.info.format, ds.info.num_samples, ds.info.sample_shape) == ("image-folder", 3, (3, 16, 12))
    assert (ds.info.layout, ds.info.value_range, ds.info.num_classes) == ("NHWC", "uint8 0-255", 2)
    got_x, got_y = read_all(ds, 2)
    assert list(got_y) == [0, 0, 1]  # ant/a.jpg, ant/b.png, zebra/1.png
    assert np.abs(got_x[0] - scaled(c.transpose(2, 0, 1))).max() < 0.06
    assert np.array_equal(got_x[1], scaled(b.transpose(2, 0, 1)))
    assert np.array_equal(got_x[2], scaled(a.transpose(2, 0, 1)))


def test_image_folder_grey_and_splits(tmp_path: Path) -> None:
    g = u8(3, 7, 7)
    write_images(tmp_path / "d" / "test", {"0": [("a.png", g[0])], "1": [("b.png", g[1]), ("c.png", g[2])]})
    write_images(tmp_path / "d" / "train", {"0": [("a.png", g[0])]})
    ds = open_dataset(tmp_path / "d")
    assert (ds.info.num_samples, ds.info.sample_shape, ds.info.layout) == (3, (1, 7, 7), "NHW")
    assert np.array_equal(read_all(ds)[0], scaled(g[:, None]))
    assert open_dataset(tmp_path / "d", split="train").info.num_samples == 1


def test_image_folder_errors(tmp_path: Path) -> None:
    write_images(tmp_path / "d", {"a": [("1.png", u8(4, 4, 3)), ("2.png", u8(5, 4, 3))]})
    with pytest.raises(DataError, match="all images must have the same size") as exc:
        list(open_dataset(tmp_path / "d").batches(4))
    assert message(exc).startswith(str(tmp_path / "d" / "a" / "2.png"))
    (tmp_path / "d" / "a" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="corrupt or unreadable image") as exc:
        list(open_dataset(tmp_path / "d").batches(4))
    assert message(exc).startswith(str(tmp_path / "d" / "a" / "2.png"))
    (tmp_path / "e" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="the dataset is empty"):
        open_dataset(tmp_path / "e")


# ---------------------------------------------------------------- errors common to all formats


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        open_dataset(tmp_path / "missing.npz")
    (tmp_path / "d.csv").write_text("1,2,3")
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        open_dataset(tmp_path / "d.csv")
    with pytest.raises(DataError, match="unknown format 'csv'"):
        open_dataset(tmp_path / "d.csv", format="csv")
    with pytest.raises(DataError, match="unknown split"):
        open_dataset(tmp_path / "d.csv", split="val")
    np.savez(tmp_path / "keys.npz", images=u8(2, 3), targets=np.zeros(2))
    with pytest.raises(DataError, match="the file holds: images, targets") as exc:
        open_dataset(tmp_path / "keys.npz")
    assert message(exc).startswith(str(tmp_path / "keys.npz"))
    np.savez(tmp_path / "len.npz", x=u8(3, 2), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="x holds 3 samples but y holds 2 labels"):
        open_dataset(tmp_path / "len.npz")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 2), np.uint8), y=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="the dataset is empty"):
        open_dataset(tmp_path / "empty.npz")
    np.savez(tmp_path / "frac.npz", x=u8(3, 2), y=np.array([0.0, 1.5, 2.0]))
    with pytest.raises(DataError, match="sample 1: label 1.5 is not an integer"):
        open_dataset(tmp_path / "frac.npz")
    np.savez(tmp_path / "str.npz", x=u8(2, 2), y=np.array(["a", "b"]))
    with pytest.raises(DataError, match="expected integer class indices"):
        open_dataset(tmp_path / "str.npz")
    np.savez(tmp_path / "hot.npz", x=u8(2, 2), y=np.eye(2))
    with pytest.raises(DataError, match="expected class indices of shape"):
        open_dataset(tmp_path / "hot.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([[1], "a"], dtype=object), y=np.zeros(2))
    with pytest.raises(DataError, match="holds Python objects"):
        open_dataset(tmp_path / "obj.npz")


def test_truncated_npz(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "d.npz", x=u8(50, 8, 8), y=np.zeros(50, np.int64))
    data = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable .npz archive") as exc:
        open_dataset(tmp_path / "cut.npz")
    assert message(exc).startswith(str(tmp_path / "cut.npz"))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as z:  # intact archive whose member lacks its rows
        z.writestr("x.npy", npy_bytes(u8(10, 4))[:-8])
        z.writestr("y.npy", npy_bytes(np.zeros(10, np.int64)))
    with pytest.raises(DataError, match="truncated: x.npy holds"):
        open_dataset(tmp_path / "short.npz")


def test_streaming_memory_is_bounded(tmp_path: Path) -> None:
    x = np.zeros((12000, 64, 64), np.uint8)  # 48 MiB of pixels (192 MiB as float32), a tiny compressed file
    np.savez_compressed(tmp_path / "big.npz", x=x, y=np.zeros(12000, np.int64))
    del x
    tracemalloc.start()
    try:
        ds = open_dataset(tmp_path / "big.npz")
        for xb, _ in ds.batches(100):
            assert xb.shape == (100, 1, 64, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


# ---------------------------------------------------------------- check_fits


def test_check_fits(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=u8(6, 28, 28), y=np.array([0, 1, 2, 9, 12, 3]))
    ds = open_dataset(tmp_path / "d.npz")
    check_fits(ds, sample_shape=(1, 28, 28), num_classes=13)
    with pytest.raises(DataError, match=r"samples have shape \(1, 28, 28\) but the model expects \(784,\)"):
        check_fits(ds, sample_shape=(784,), num_classes=13)
    with pytest.raises(DataError, match=r"sample 4 has label 12, but the model has 10 classes") as exc:
        check_fits(ds, sample_shape=(1, 28, 28), num_classes=10)
    assert message(exc).startswith(str(tmp_path / "d.npz"))
    np.savez(tmp_path / "neg.npz", x=u8(3, 4), y=np.array([0, -1, 0]))
    with pytest.raises(DataError, match="sample 1 has label -1"):
        check_fits(open_dataset(tmp_path / "neg.npz"), sample_shape=(4,), num_classes=2)
    np.savez(tmp_path / "hwc.npz", x=u8(2, 3, 4, 5), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="is the layout wrong"):
        check_fits(open_dataset(tmp_path / "hwc.npz"), sample_shape=(4, 5, 3), num_classes=2)


def test_check_fits_reads_no_images(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=u8(4, 2), y=np.array([0, 1, 5, 1]))
    ds = open_dataset(tmp_path / "d.npz")
    ds._source.x_chunks = None  # any attempt to read x would fail with TypeError
    with pytest.raises(DataError, match="sample 2 has label 5"):
        check_fits(ds, sample_shape=(2,), num_classes=3)


def test_check_fits_empty() -> None:
    class Empty:
        info = DatasetInfo("mem", "npz", 0, (2,), "NC", "float 0-1", None, "")

        def labels(self, start=0, stop=None, chunk_size=65536):
            return iter(())

    with pytest.raises(DataError, match="the dataset is empty"):
        check_fits(Empty(), sample_shape=(2,), num_classes=2)


# ---------------------------------------------------------------- image decoding in worker processes


def _live_workers() -> list:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name.startswith("lipcert-decode")]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_image_folder_workers_keep_the_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    from lipcert.data import image_folder

    monkeypatch.setattr(image_folder, "START_METHOD", method)
    images = {cls: [(f"{i:02d}.png", u8(8, 6, 3)) for i in range(n)] for cls, n in (("a", 9), ("b", 14), ("c", 7))}
    write_images(tmp_path / "d", images)
    in_process = read_all(open_dataset(tmp_path / "d", workers=0), 4)
    ds = open_dataset(tmp_path / "d", workers=2)
    got_x, got_y = read_all(ds, 4, start=3)  # 27 images in chunks of 4: both workers busy, results out of order
    assert np.array_equal(got_x, in_process[0][3:]) and np.array_equal(got_y, in_process[1][3:])
    expected = np.stack([a for cls in "abc" for _, a in images[cls]]).transpose(0, 3, 1, 2)
    assert np.array_equal(in_process[0], scaled(expected))
    assert not _live_workers()


def test_image_folder_workers_stop_with_the_reader(tmp_path: Path) -> None:
    images = [(f"{i:02d}.png", u8(5, 5, 3)) for i in range(40)]
    write_images(tmp_path / "d", {"a": images})
    batches = open_dataset(tmp_path / "d", workers=2).batches(4)
    next(batches)
    assert len(_live_workers()) == 2
    batches.close()  # the consumer stops early: the workers end with the generator
    assert not _live_workers()
    (tmp_path / "d" / "a" / "30.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="corrupt or unreadable image") as exc:
        read_all(open_dataset(tmp_path / "d", workers=2), 4)
    assert message(exc).startswith(str(tmp_path / "d" / "a" / "30.png"))
    assert not _live_workers()


def test_image_folder_default_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from lipcert.data import image_folder

    write_images(tmp_path / "d", {"a": [(f"{i:02d}.png", u8(4, 4)) for i in range(12)]})
    source = open_dataset(tmp_path / "d")._source
    assert source._workers_for(12, 3) == 0  # a small dataset is decoded in the main process
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert image_folder.default_workers() == (min(4, cores) if cores >= 2 else 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # torchrun with a process per core: no workers
    assert image_folder.default_workers() == 0
    monkeypatch.setattr(image_folder, "PARALLEL_MIN", 10)
    monkeypatch.setattr(image_folder, "default_workers", lambda: 3)
    assert (source._workers_for(12, 3), source._workers_for(12, 2), source._workers_for(12, 1)) == (3, 2, 0)
    source.workers = 1  # asked for: used whatever the size, but never more than the chunks
    assert (source._workers_for(5, 3), source._workers_for(5, 1)) == (1, 0)
    with pytest.raises(LipcertError, match="workers must be 0"):
        open_dataset(tmp_path / "d", workers=-1)


WORKER_SCRIPT = """
import sys, time
from lipcert.data import open_dataset
batches = open_dataset(sys.argv[1], workers=2).batches(2)
next(batches)
import multiprocessing
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(600)
"""


def test_image_folder_workers_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    write_images(tmp_path / "d", {"a": [(f"{i:02d}.png", u8(5, 5)) for i in range(40)]})
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(tmp_path / "d")], stdout=subprocess.PIPE,
                            text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(pids) == 2

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.time() + 20
    while any(running(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    leaked = [pid for pid in pids if running(pid)]
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, "decoding workers outlived their parent"


# ---------------------------------------------------------------- bad samples, skipped


def test_skip_bad_samples_npz(tmp_path: Path) -> None:
    from lipcert.data import read_batches

    x = RNG.random((10, 3)).astype(np.float32)
    x[2, 0], x[7, 1] = np.nan, np.inf
    y = np.array([0, 1, 2, 1.5, 0, 1, 2, 0, 9, 1])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(DataError, match="sample 2: x contains NaN or Inf"):
        open_dataset(tmp_path / "d.npz")
    ds = open_dataset(tmp_path / "d.npz", skip_bad_samples=True)
    assert (ds.info.value_range, ds.info.num_classes) == ("float 0-1", 10)  # the scans passed over the bad ones
    with pytest.raises(DataError, match="sample 2: x contains NaN or Inf"):
        list(read_batches(ds, 4))
    batches = list(read_batches(ds, 4, skip_bad_samples=True, labels=Labels(3)))
    assert [list(b.indices) for b in batches] == [[0, 1], [4, 5, 6], [9]]  # batches keep their index ranges
    assert [s for b in batches for s in b.skipped] == [
        (2, "x contains NaN or Inf"), (3, "label 1.5 is not an integer"), (7, "x contains NaN or Inf"),
        (8, "label 9, but the model has 3 classes (0..2)")]
    assert np.array_equal(np.concatenate([b.x for b in batches]), x[[0, 1, 4, 5, 6, 9]])
    assert np.array_equal(np.concatenate([b.y for b in batches]), [0, 1, 0, 1, 2, 1])
    sharded = list(read_batches(ds, 4, start=4, stop=8, skip_bad_samples=True))
    assert [list(b.indices) for b in sharded] == [[4, 5, 6]] and sharded[0].skipped == [(7, "x contains NaN or Inf")]


def test_skip_bad_samples_image_folder(tmp_path: Path) -> None:
    from lipcert.data import read_batches

    a = u8(3, 6, 5, 3)
    write_images(tmp_path / "d", {"a": [("0.png", a[0]), ("1.png", a[1]), ("2.png", u8(5, 5, 3))],
                                  "b": [("3.png", a[2])]})
    (tmp_path / "d" / "a" / "0.png").write_bytes(b"not an image")  # the first image: the size comes from the next
    ds = open_dataset(tmp_path / "d", skip_bad_samples=True)
    assert ds.info.sample_shape == (3, 6, 5)
    for workers in (0, 2):
        ds._source.workers = workers
        batches = list(read_batches(ds, 1, skip_bad_samples=True, labels=Labels(2)))
        assert [list(b.indices) for b in batches] == [[], [1], [], [3]]
        assert [i for b in batches for i, _ in b.skipped] == [0, 2]
        reasons = [why for b in batches for _, why in b.skipped]
        assert reasons[0].startswith("a/0.png: corrupt or unreadable image")
        assert reasons[1] == "a/2.png: the image is 5x5 but the first image is 5x6; all images must have the same size"
        assert np.array_equal(np.concatenate([b.x for b in batches]), scaled(a[1:].transpose(0, 3, 1, 2)))
    with pytest.raises(DataError, match="corrupt or unreadable image") as exc:
        list(open_dataset(tmp_path / "d").batches(4))
    assert message(exc).startswith(str(tmp_path / "d" / "a" / "0.png"))


def test_skip_bad_samples_keeps_whole_file_faults(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "d.npz", x=u8(50, 8, 8), y=np.zeros(50, np.int64))
    data = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable .npz archive"):
        open_dataset(tmp_path / "cut.npz", skip_bad_samples=True)
    (tmp_path / "e" / "a").mkdir(parents=True)
    (tmp_path / "e" / "a" / "x.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="corrupt or unreadable image"):  # no image of the folder can be read
        open_dataset(tmp_path / "e", skip_bad_samples=True)


def test_skip_bad_samples_of_another_dataset() -> None:
    from lipcert.data import read_batches

    x = np.zeros((5, 2), np.float32)
    x[1, 0], x[3, 1] = np.nan, 1.5

    class Memory:
        info = DatasetInfo("mem", "npz", 5, (2,), "NC", "float 0-1", 2, "")

        def batches(self, batch_size, start=0, stop=None):
            for first in range(start, stop or 5, batch_size):
                yield x[first:first + batch_size], np.zeros(len(x[first:first + batch_size]), np.int64)

    batches = list(read_batches(Memory(), 2, skip_bad_samples=True, labels=Labels(2)))
    assert [list(b.indices) for b in batches] == [[0], [2], [4]]
    assert [i for b in batches for i, _ in b.skipped] == [1, 3]
