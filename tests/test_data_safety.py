"""CIFAR python batches are read by a restricted unpickler: real files (Python 2 and Python 3 written) load, a crafted
file that would run code is refused before anything runs, and a download never goes through torchvision's loader."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from fedlit.config import DataConfig
from fedlit.data import datasets
from fedlit.data.base import Preprocess
from fedlit.data.registry import build_dataset
from fedlit.errors import UserError
from tests.test_datasets import CIFAR10_NAMES, make_cifar10

PRE = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class _RunsAShellCommand:
    """Unpickling this runs ``touch <marker>`` (what a crafted CIFAR file would do with ``os.system``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING opcodes), as cPickle wrote the official
    CIFAR files; loading them with ``encoding='latin1'`` gives ``str``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def python2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2 with numpy < 2 did: protocol 2, str opcodes, ``numpy.core.multiarray``."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    numpy2, numpy1 = b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n"
    return buffer.getvalue().replace(numpy2, numpy1)


def test_python3_protocol2_batches_load(tmp_path):
    labels = make_cifar10(tmp_path)  # protocol 2, bytes keys, uint8 arrays (bytes via _codecs.encode)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert b"c_codecs\nencode\n" in raw  # the format does need _codecs.encode
    b = build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), PRE)
    assert b.classnames == CIFAR10_NAMES
    assert b.train.targets.tolist() == labels["train"] and b.test.targets.tolist() == [9, 0, 4]
    assert np.asarray(b.train.load_image(7))[5, 9].tolist() == [7, 107, 200]


def test_python2_written_batches_load(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = np.arange(4 * 3072, dtype=np.int64).reshape(4, 3072).astype(np.uint8)  # every byte value occurs
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4, 1], b"data": images,
             b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
    raw = python2_pickle(batch)
    assert b"_codecs" not in raw and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(raw)
    (folder / "batches.meta").write_bytes(python2_pickle({b"label_names": [n.encode() for n in CIFAR10_NAMES],
                                                          b"num_cases_per_batch": 4, b"num_vis": 3072}))
    b = build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), PRE)
    assert b.classnames == CIFAR10_NAMES
    assert b.train.targets.tolist() == [3, 1, 4, 1] * 5 and b.test.targets.tolist() == [3, 1, 4, 1]
    assert np.array_equal(b.train.images[2], images[2].reshape(3, 32, 32).transpose(1, 2, 0))  # bytes intact


@pytest.mark.parametrize("target", ["data_batch_1", "batches.meta"])
def test_crafted_batch_is_refused_and_its_payload_never_runs(tmp_path, target):
    make_cifar10(tmp_path)
    marker = tmp_path / "payload-ran"
    path = tmp_path / "cifar-10-batches-py" / target
    with open(path, "wb") as f:
        pickle.dump({b"labels": [0], b"data": _RunsAShellCommand(marker)}, f, protocol=2)
    with pytest.raises(UserError) as err:
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), PRE)
    assert str(err.value) == f"refusing to unpickle posix.system from {path}: not a CIFAR batch (replace the file " \
                             "with the official one)"
    assert not marker.exists()
    os.system(f"touch {marker}")  # the check above can fail: the same command does create the marker
    assert marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("collections", "OrderedDict"),
                                          ("numpy", "load"), ("torch", "load")])
def test_any_other_global_is_refused(tmp_path, module, name):
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")  # protocol 2: call module.name()
    with pytest.raises(UserError, match=f"refusing to unpickle {module}.{name} from .*test_batch: not a CIFAR"):
        datasets.load_cifar_pickle(path)


def test_codecs_encode_is_admitted_for_latin1_only(tmp_path):
    path = tmp_path / "meta"
    call = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX%s\x86R."  # _codecs.encode('abc', <encoding>)
    path.write_bytes(call.replace(b"%s", struct.pack("<I", 6) + b"latin1"))
    assert datasets.load_cifar_pickle(path) == b"abc"
    path.write_bytes(call.replace(b"%s", struct.pack("<I", 5) + b"rot13"))
    with pytest.raises(pickle.UnpicklingError, match="'rot13' is not a pickled bytes object"):
        datasets.load_cifar_pickle(path)


def test_download_extracts_the_archive_without_torchvision_unpickling(tmp_path, monkeypatch):
    import torchvision.datasets as tv
    import torchvision.datasets.utils as tv_utils

    fetched = []

    def fake_download(url, root, filename=None, md5=None):
        fetched.append((url, filename, md5))
        make_cifar10(Path(root))  # what extracting the archive leaves behind

    def no_torchvision_loader(*args, **kwargs):
        raise AssertionError("torchvision's CIFAR10 (plain pickle) was constructed")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    monkeypatch.setattr(tv.CIFAR10, "__init__", no_torchvision_loader)
    b = build_dataset(DataConfig(name="cifar10", root=str(tmp_path / "data"), download=True), PRE)
    assert fetched == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                        "c58f30108f718f92721af3b95e74349a")]
    assert b.classnames == CIFAR10_NAMES and len(b.train) == 10
