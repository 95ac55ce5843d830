"""Loaders of the real datasets of the papers, each ``build_<name>(cfg, preprocess) -> DatasetBundle``.

Every bundle has ``classnames`` ordered by label id (cleaned as CoOp does; underscores become spaces), lazy
train/test splits (images are read on access) and the transforms of SPEC §4. Files are looked for under
``cfg.root`` (``data.root``), in these folders:

=================  =====================================================================================
cifar10            ``cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta: the python pickles)
cifar100           ``cifar-100-python/`` (train, test, meta)
caltech101         ``caltech101/101_ObjectCategories/<class>/image_0001.jpg`` (torchvision), or CoOp's
                   ``caltech-101/101_ObjectCategories`` with ``split_zhou_Caltech101.json``
oxford_pets        ``oxford-iiit-pet/{images,annotations}`` (annotations/trainval.txt, test.txt), or CoOp's
                   ``oxford_pets/`` with ``split_zhou_OxfordPets.json``
flowers102         ``flowers-102/{jpg/,imagelabels.mat,setid.mat}`` (reading the .mat files needs scipy), or
                   CoOp's ``oxford_flowers/jpg`` with ``split_zhou_OxfordFlowers.json``
food101            ``food-101/{images/<class>/*.jpg, meta/train.json, meta/test.json}``
dtd                ``dtd/dtd/{images,labels}`` (torchvision) or CoOp's ``dtd/images``;
                   ``split_zhou_DescribableTextures.json`` goes in ``dtd/``
domainnet          ``domainnet/<domain>/<class>/*.jpg`` + ``domainnet/<domain>_{train,test}.txt``
office_caltech10   ``office_caltech10/<domain>/<class>/*.jpg`` (+ optional ``<domain>_{train,test}.txt``)
=================  =====================================================================================

``data.download=true`` lets torchvision download the datasets it knows (all but DomainNet and Office). CIFAR
batches are python pickles: they are read by :class:`CifarUnpickler`, which admits numpy array reconstruction and
nothing else, so a crafted file cannot run code (torchvision's own CIFAR loader, plain pickle, is never used).

Splits. With a CoOp split file in the dataset folder (and ``data.use_split_file``), its "train" list is the
train split and its "test" list the test split ("val" is unused), with the file's labels and class names;
its paths are relative to the image folder. Without one: CIFAR, Pets, Food101 use the official train/test;
Flowers102 and DTD (partition 1) use official train+val as train and official test as test; Caltech101 has
no official split and is split as CoOp does (per class: 50 % train, 20 % val, 30 % test, val unused), with
files in torchvision's order permuted by ``numpy.random.default_rng([0, label])``. DomainNet uses the
official lists filtered to its 10 classes, labels re-derived from the class folder name. Office-Caltech10
uses ``<domain>_train.txt`` / ``<domain>_test.txt`` when both exist, else per (domain, class): files sorted
by name, permuted by ``numpy.random.default_rng([0, domain_id, label])``, the first ``(n + 2) // 5``
(20 %, rounded half up) are test and the rest train.

Augmentation default (``data.augment`` unset): on for the five CLIP datasets (CoOp's recipe), off for CIFAR
(SPEC §4) and for DomainNet/Office (so that their train features can be cached; set ``data.augment=true``
to change it).
"""

from __future__ import annotations

import codecs
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from fedlit.config import DATASET_DOMAINS, DataConfig
from fedlit.data.base import DatasetBundle, LabeledImages, Preprocess
from fedlit.data.transforms import test_transform, train_transform, transform_id
from fedlit.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

# label id -> name; the official names of the 102 categories (CoOp's cat_to_name.json, torchvision's list)
FLOWERS102_CLASSNAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium",
    "orange dahlia", "pink-yellow dahlia?", "cautleya spicata", "japanese anemone", "black-eyed susan",
    "silverbush", "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower",
    "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple", "morning glory",
    "passion flower", "lotus", "toad lily", "anthurium", "frangipani", "clematis", "hibiscus", "columbine",
    "desert-rose", "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily", "hippeastrum",
    "bee balm", "ball moss", "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia",
    "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)
# CoOp's Caltech101 cleaning: drop the clutter class and the duplicate face class, rename four classes
CALTECH101_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH101_RENAMED = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard",
                      "Motorbikes": "motorbike"}
DOMAINNET_CLASSES = ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill",
                     "wine_glass", "zebra")
DOMAINNET_DOMAINS = DATASET_DOMAINS["domainnet"]
OFFICE_CLASSES = ("back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer", "monitor",
                  "mouse", "mug", "projector")
OFFICE_DOMAINS = DATASET_DOMAINS["office_caltech10"]

DOMAINNET_URL = "http://ai.bu.edu/M3SDA/ (the image zips and the *_train.txt / *_test.txt lists)"
OFFICE_URL = ("the Office-Caltech10 release of Gong et al. (CVPR 2012), e.g. via "
              "https://github.com/jindongwang/transferlearning/tree/master/data")

Split = tuple[list[str], list[int]]  # (image paths, labels)


# ----------------------------------------------------------------------------------------------- splits
class ArrayImages(LabeledImages):
    """A split held in memory: ``images`` uint8 ``(N, H, W, 3)``; ``load_image`` returns a PIL image."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], transform: Callable | None = None):
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


class FileImages(LabeledImages):
    """A split of image files, read lazily as RGB PIL images; ``domains`` (int64 ``(N,)``) optional."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int], transform: Callable | None = None,
                 domains: Sequence[int] | None = None):
        self.paths = list(paths)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.domains = None if domains is None else np.asarray(domains, dtype=np.int64)

    def load_image(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])


def load_rgb(path: str | Path) -> Image.Image:
    """The image file ``path`` as an RGB PIL image; a missing or unreadable file raises one line naming it."""
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports corrupt data as any of these
        raise UserError(f"cannot read image {path}: corrupt or not an image ({err})") from None


def _clean(name: str) -> str:
    return name.replace("_", " ")


def _resolve_augment(cfg: DataConfig, default: bool) -> bool:
    return default if cfg.augment is None else bool(cfg.augment)


def _bundle(cfg: DataConfig, pre: Preprocess, classnames: list[str], train: LabeledImages,
            test: LabeledImages, augment_default: bool,
            domain_names: list[str] | None = None) -> DatasetBundle:
    augment = _resolve_augment(cfg, augment_default)
    train.transform = train_transform(pre, augment)
    test.transform = test_transform(pre)
    return DatasetBundle(name=cfg.name, classnames=classnames, train=train, test=test,
                         domain_names=domain_names, transform_id=transform_id(pre), augmented=augment)


def _root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser()


def _ordered_names(names: dict[int, str], source: str) -> list[str]:
    """``{label: name}`` -> names ordered by label; labels must be exactly 0..C-1."""
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
        raise UserError(f"{source}: labels are not 0..C-1 (no sample of label(s) {missing[:5]})")
    return [names[i] for i in range(len(names))]


# ------------------------------------------------------------------------------------------------ CIFAR
@dataclass(frozen=True)
class _CifarSpec:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str
    labels_key: str
    url: str


_CIFAR10 = _CifarSpec("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      ("test_batch",), "batches.meta", "label_names", "labels",
                      "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
_CIFAR100 = _CifarSpec("CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta", "fine_label_names",
                       "fine_labels", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it (``encode(text, 'latin1')``), and nothing else."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not a pickled bytes object")
    return codecs.encode(text, encoding, errors)


# What CIFAR python batches hold: dicts of str/bytes, lists and ints, and uint8 numpy arrays (written by Python 2's
# cPickle, so numpy's pre-2.0 module path; or by Python 3 with protocol 2, so bytes come through _codecs.encode).
_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
CIFAR_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR python batch and nothing else: any global other than the numpy array reconstruction of
    :data:`CIFAR_PICKLE_GLOBALS` (e.g. ``os.system`` in a crafted file) raises a :class:`UserError` naming the file
    before anything is called. Python 2 strings are decoded as latin-1, as torchvision does."""

    def __init__(self, handle: Any, path: Path):
        super().__init__(handle, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object for ``module.name``; a UserError for anything else."""
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise UserError(f"refusing to unpickle {module}.{name} from {self.path}: not a CIFAR batch "
                            "(replace the file with the official one)")
        return CIFAR_PICKLE_GLOBALS[(module, name)]


def load_cifar_pickle(path: str | Path) -> Any:
    """The object in the CIFAR python batch ``path``, read by :class:`CifarUnpickler` (never plain pickle)."""
    path = Path(path)
    with open(path, "rb") as handle:
        return CifarUnpickler(handle, path).load()


def _unpickle(path: Path, spec: _CifarSpec) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{spec.title} file not found: {path}; set data.download=true or extract "
                        f"{spec.url} into {path.parent.parent}")
    try:
        obj = load_cifar_pickle(path)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - unpickling fails in many ways on a corrupt file
        raise UserError(f"cannot read {path}: not a CIFAR python pickle "
                        f"({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise UserError(f"cannot read {path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_split(folder: Path, files: tuple[str, ...], spec: _CifarSpec) -> tuple[np.ndarray, list[int]]:
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path, spec)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            batch_labels = [int(v) for v in batch[spec.labels_key]]
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"cannot read {path}: missing or bad field {err}") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch_labels) != len(data):
            raise UserError(f"cannot read {path}: expected data (N, 3072) and N labels, got data "
                            f"{data.shape} and {len(batch_labels)} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), labels


def _build_cifar(cfg: DataConfig, pre: Preprocess, spec: _CifarSpec, tv_class: str) -> DatasetBundle:
    root = _root(cfg)
    folder = root / spec.folder
    if not folder.is_dir():
        if not cfg.download:
            raise UserError(f"{spec.title} not found: expected {folder}; set data.download=true to "
                            f"download it, or extract {spec.url} into {root}")
        _torchvision_download(spec.title, root, lambda tv: _fetch_cifar_archive(getattr(tv, tv_class), root))
    meta_path = folder / spec.meta_file
    meta = _unpickle(meta_path, spec)
    if spec.names_key not in meta:
        raise UserError(f"cannot read {meta_path}: no '{spec.names_key}' entry")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec.names_key]]
    train_x, train_y = _cifar_split(folder, spec.train_files, spec)
    test_x, test_y = _cifar_split(folder, spec.test_files, spec)
    for path, labels in ((folder / spec.train_files[0], train_y), (folder / spec.test_files[0], test_y)):
        if labels and not 0 <= min(labels) <= max(labels) < len(names):
            raise UserError(f"{path}: labels outside 0..{len(names) - 1} of {meta_path}")
    return _bundle(cfg, pre, [_clean(n) for n in names], ArrayImages(train_x, train_y),
                   ArrayImages(test_x, test_y), augment_default=False)


def _fetch_cifar_archive(tv_dataset: Any, root: Path) -> None:
    """Download and extract torchvision's CIFAR archive (its URL and md5) into ``root`` without constructing the
    torchvision dataset, which would unpickle the batches with plain pickle."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(tv_dataset.url, str(root), filename=tv_dataset.filename, md5=tv_dataset.tgz_md5)


def build_cifar10(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """CIFAR-10 from its python pickles: 50,000 train and 10,000 test 32×32 images, 10 classes."""
    return _build_cifar(cfg, preprocess, _CIFAR10, "CIFAR10")


def build_cifar100(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """CIFAR-100 (fine labels) from its python pickles: 50,000 train and 10,000 test images, 100 classes."""
    return _build_cifar(cfg, preprocess, _CIFAR100, "CIFAR100")


def _torchvision_download(title: str, root: Path, fetch: Callable[[Any], Any]) -> None:
    """Let torchvision download (and verify) a dataset into ``root``; failures become one line."""
    import torchvision.datasets as tv

    root.mkdir(parents=True, exist_ok=True)
    try:
        fetch(tv)
    except Exception as err:  # noqa: BLE001 - network, checksum and archive errors of many kinds
        raise UserError(f"downloading {title} into {root} failed ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None


# -------------------------------------------------------------------------------- CLIP datasets (CoOp)
@dataclass(frozen=True)
class _Layout:
    folder: str  # dataset folder under data.root; the CoOp split file lives here
    images: str  # image folder inside ``folder``; CoOp split paths are relative to it
    torchvision: bool  # torchvision's own layout (readable without a split file)


@dataclass(frozen=True)
class _ClipSpec:
    title: str
    split_file: str
    layouts: tuple[_Layout, ...]  # torchvision's first
    url: str


def read_split_file(path: Path, image_dir: Path) -> tuple[Split, Split, list[str]]:
    """Read a CoOp split file ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``.

    Returns (train, test, classnames): paths joined to ``image_dir``, the file's labels, and its class names
    (cleaned, ordered by label; taken from all three lists).
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read CoOp split file {path}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("train", "test")):
        raise UserError(f"cannot read CoOp split file {path}: expected a JSON object with 'train' and "
                        "'test' lists of [relpath, label, classname]")
    names: dict[int, str] = {}
    splits: dict[str, Split] = {}
    for key in ("train", "val", "test"):
        paths, labels = [], []
        for entry in data.get(key) or []:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], int) and isinstance(entry[2], str)):
                raise UserError(f"cannot read CoOp split file {path}: bad '{key}' entry {entry!r} "
                                "(expected [relpath, label, classname])")
            rel, label, name = entry
            if names.setdefault(label, name) != name:
                raise UserError(f"CoOp split file {path}: label {label} is named both "
                                f"'{names[label]}' and '{name}'")
            paths.append(str(image_dir / rel))
            labels.append(label)
        splits[key] = (paths, labels)
    classnames = [_clean(n) for n in _ordered_names(names, f"CoOp split file {path}")]
    for key in ("train", "test"):
        first = splits[key][0][:1]
        if not first:
            raise UserError(f"CoOp split file {path}: the '{key}' list is empty")
        if not Path(first[0]).is_file():
            raise UserError(f"{first[0]} (listed in {path}) not found: the split's paths are "
                            f"relative to {image_dir}")
    return splits["train"], splits["test"], classnames


def _find_layout(root: Path, spec: _ClipSpec) -> _Layout | None:
    for layout in spec.layouts:
        if (root / layout.folder / layout.images).is_dir():
            return layout
    return None


def _missing_message(root: Path, spec: _ClipSpec) -> str:
    tv_layout = spec.layouts[0]
    alt = [f"{root / lay.folder / lay.images} with {root / lay.folder / spec.split_file}"
           for lay in spec.layouts[1:]]
    alt_text = f" (or CoOp's {alt[0]})" if alt else ""
    return (f"{spec.title} not found: expected {root / tv_layout.folder / tv_layout.images}{alt_text}; "
            f"set data.download=true to download it with torchvision, or get it from {spec.url}")


def _wrap_torchvision(fetch: Callable[[], Any], files: str) -> Any:
    """Run a torchvision dataset constructor; its file errors become one line naming ``files``."""
    try:
        return fetch()
    except FileNotFoundError as err:
        raise UserError(f"missing file {err.filename or err} (needed: {files})") from None
    except (ValueError, KeyError, IndexError, RuntimeError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"cannot read {files}: {type(err).__name__}: {err}") from None


def _require_files(spec: _ClipSpec, paths: Sequence[Path]) -> None:
    for path in paths:
        if not path.is_file():
            raise UserError(f"{spec.title} file not found: {path}; set data.download=true or get the "
                            f"dataset from {spec.url}")


def _build_clip(cfg: DataConfig, pre: Preprocess, spec: _ClipSpec,
                read_official: Callable[[Path], tuple[Split, Split, list[str]]],
                download: Callable[[Any, Path], Any]) -> DatasetBundle:
    root = _root(cfg)
    layout = _find_layout(root, spec)
    if layout is None:
        if not cfg.download:
            raise UserError(_missing_message(root, spec))
        _torchvision_download(spec.title, root, lambda tv: download(tv, root))
        layout = _find_layout(root, spec)
        if layout is None:
            raise UserError(f"{_missing_message(root, spec)} (still missing after the download)")
    folder = root / layout.folder
    split_path = folder / spec.split_file
    if cfg.use_split_file and split_path.is_file():
        train, test, classnames = read_split_file(split_path, folder / layout.images)
    elif not layout.torchvision:
        raise UserError(f"{spec.title}: {folder} has CoOp's layout but no {spec.split_file}; put "
                        f"CoOp's split file there (and set data.use_split_file=true) or use "
                        f"torchvision's layout {root / spec.layouts[0].folder}")
    else:
        train, test, classnames = read_official(root)
    return _bundle(cfg, pre, classnames, FileImages(*train), FileImages(*test), augment_default=True)


_CALTECH101 = _ClipSpec("Caltech101", "split_zhou_Caltech101.json",
                        (_Layout("caltech101", "101_ObjectCategories", True),
                         _Layout("caltech-101", "101_ObjectCategories", False)),
                        "https://data.caltech.edu/records/mzrjq-6wc02")
_PETS = _ClipSpec("OxfordPets", "split_zhou_OxfordPets.json",
                  (_Layout("oxford-iiit-pet", "images", True), _Layout("oxford_pets", "images", False)),
                  "https://www.robots.ox.ac.uk/~vgg/data/pets/")
_FLOWERS = _ClipSpec("Flowers102", "split_zhou_OxfordFlowers.json",
                     (_Layout("flowers-102", "jpg", True), _Layout("oxford_flowers", "jpg", False)),
                     "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/")
_FOOD = _ClipSpec("Food101", "split_zhou_Food101.json", (_Layout("food-101", "images", True),),
                  "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/")
_DTD = _ClipSpec("DTD", "split_zhou_DescribableTextures.json",
                 (_Layout("dtd", "dtd/images", True), _Layout("dtd", "images", False)),
                 "https://www.robots.ox.ac.uk/~vgg/data/dtd/")


def _caltech_official(root: Path) -> tuple[Split, Split, list[str]]:
    from torchvision.datasets import Caltech101

    tv = _wrap_torchvision(lambda: Caltech101(str(root)), f"{root / 'caltech101' / '101_ObjectCategories'}")
    image_dir = root / "caltech101" / "101_ObjectCategories"
    kept = [c for c in tv.categories if c not in CALTECH101_IGNORED]
    files: dict[str, list[str]] = {c: [] for c in kept}
    for number, category_id in zip(tv.index, tv.y):
        category = tv.categories[category_id]
        if category in files:
            files[category].append(str(image_dir / category / f"image_{number:04d}.jpg"))
    train: Split = ([], [])
    test: Split = ([], [])
    for label, category in enumerate(kept):
        paths = files[category]
        order = np.random.default_rng([0, label]).permutation(len(paths))
        n_train, n_val = round(len(paths) * 0.5), round(len(paths) * 0.2)  # CoOp's 50/20/30 split
        for i, position in enumerate(order):
            target = train if i < n_train else test if i >= n_train + n_val else None
            if target is not None:
                target[0].append(paths[position])
                target[1].append(label)
    return train, test, [_clean(CALTECH101_RENAMED.get(c, c)) for c in kept]


def build_caltech101(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """Caltech101 as in CoOp: 100 classes (no background, no ``Faces_easy``), CoOp's split file or a 50/20/30
    per-class split (train/val/test; val unused)."""
    return _build_clip(cfg, preprocess, _CALTECH101, _caltech_official,
                       lambda tv, root: tv.Caltech101(str(root), download=True))


def _pets_official(root: Path) -> tuple[Split, Split, list[str]]:
    from torchvision.datasets import OxfordIIITPet

    anns = root / "oxford-iiit-pet" / "annotations"
    _require_files(_PETS, [anns / "trainval.txt", anns / "test.txt"])
    splits, names = [], {}
    for split in ("trainval", "test"):
        tv = _wrap_torchvision(lambda s=split: OxfordIIITPet(str(root), split=s), f"{anns / split}.txt")
        paths = [str(p) for p in tv._images]
        for path, label in zip(tv._images, tv._labels):
            names.setdefault(label, _clean(Path(path).stem.rsplit("_", 1)[0].lower()))
        splits.append((paths, list(tv._labels)))
    return splits[0], splits[1], _ordered_names(names, f"{anns}/trainval.txt + test.txt")


def build_oxford_pets(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """Oxford-IIIT Pets: 37 breeds (lower-case names), official trainval/test or CoOp's split file."""
    return _build_clip(cfg, preprocess, _PETS, _pets_official,
                       lambda tv, root: tv.OxfordIIITPet(str(root), download=True))


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError(f"reading {path} needs scipy (pip install scipy), or put CoOp's "
                        f"{_FLOWERS.split_file} in {path.parent}") from None
    if not path.is_file():
        raise UserError(f"Flowers102 file not found: {path}; set data.download=true or get it from "
                        f"{_FLOWERS.url}")
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as err:  # noqa: BLE001 - scipy raises many kinds on a corrupt file
        raise UserError(f"cannot read {path}: not a MATLAB file ({type(err).__name__}: {err})") from None


def _flowers_official(root: Path) -> tuple[Split, Split, list[str]]:
    # torchvision's Flowers102 verifies the md5 of both .mat files; read the same layout directly instead
    folder = root / "flowers-102"
    labels_path, setid_path = folder / "imagelabels.mat", folder / "setid.mat"
    try:
        labels = np.asarray(_loadmat(labels_path)["labels"], dtype=np.int64).reshape(-1) - 1
    except KeyError:
        raise UserError(f"cannot read {labels_path}: no 'labels' variable") from None
    setid = _loadmat(setid_path)
    try:
        ids = {k: np.asarray(setid[k], dtype=np.int64).reshape(-1) for k in ("trnid", "valid", "tstid")}
    except KeyError as err:
        raise UserError(f"cannot read {setid_path}: no {err} variable") from None
    if labels.size and not 0 <= labels.min() <= labels.max() < len(FLOWERS102_CLASSNAMES):
        raise UserError(f"{labels_path}: labels outside 1..{len(FLOWERS102_CLASSNAMES)}")

    def split(image_ids: np.ndarray) -> Split:
        if image_ids.size and not 1 <= image_ids.min() <= image_ids.max() <= len(labels):
            raise UserError(f"{setid_path}: image ids outside 1..{len(labels)} of {labels_path}")
        return ([str(folder / "jpg" / f"image_{i:05d}.jpg") for i in image_ids.tolist()],
                labels[image_ids - 1].tolist())

    train = split(np.concatenate([ids["trnid"], ids["valid"]]))
    return train, split(ids["tstid"]), list(FLOWERS102_CLASSNAMES)


def build_flowers102(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """Oxford Flowers102: 102 official names; official train+val / test (needs scipy) or CoOp's split file."""
    return _build_clip(cfg, preprocess, _FLOWERS, _flowers_official,
                       lambda tv, root: tv.Flowers102(str(root), download=True))


def _relabel(tv_splits: list[Any], label_name: Callable[[Any, int], str]) -> tuple[list[Split], list[str]]:
    """Torchvision splits that each number their own classes -> one sorted class list shared by all."""
    classes = sorted({label_name(tv, y) for tv in tv_splits for y in set(tv._labels)})
    index = {c: i for i, c in enumerate(classes)}
    out = [([str(p) for p in tv._image_files], [index[label_name(tv, y)] for y in tv._labels])
           for tv in tv_splits]
    return out, classes


def _food_official(root: Path) -> tuple[Split, Split, list[str]]:
    from torchvision.datasets import Food101

    meta = root / "food-101" / "meta"
    _require_files(_FOOD, [meta / "train.json", meta / "test.json"])
    tvs = [_wrap_torchvision(lambda s=s: Food101(str(root), split=s), f"{meta / s}.json")
           for s in ("train", "test")]
    (train, test), classes = _relabel(tvs, lambda tv, y: tv.classes[y])
    return train, test, [_clean(c) for c in classes]


def build_food101(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """Food101: 101 dishes, official train (750/class) / test (250/class) or CoOp's split file."""
    return _build_clip(cfg, preprocess, _FOOD, _food_official,
                       lambda tv, root: tv.Food101(str(root), download=True))


def _dtd_official(root: Path) -> tuple[Split, Split, list[str]]:
    from torchvision.datasets import DTD

    labels = root / "dtd" / "dtd" / "labels"
    _require_files(_DTD, [labels / f"{s}1.txt" for s in ("train", "val", "test")])
    tvs = [_wrap_torchvision(lambda s=s: DTD(str(root), split=s, partition=1), f"{labels / s}1.txt")
           for s in ("train", "val", "test")]
    (train, val, test), classes = _relabel(tvs, lambda tv, y: tv.classes[y])
    return (train[0] + val[0], train[1] + val[1]), test, [_clean(c) for c in classes]


def build_dtd(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """DTD: 47 textures, official partition 1 (train+val / test) or CoOp's split file."""
    return _build_clip(cfg, preprocess, _DTD, _dtd_official,
                       lambda tv, root: tv.DTD(str(root), download=True))


# ------------------------------------------------------------------------------------- domain datasets
def read_domain_list(path: Path, base: Path, classes: Sequence[str]) -> Split:
    """Read an official DomainNet-style list (lines ``domain/class/file.jpg label``), keeping only the
    samples of ``classes``; labels are the class *name*'s index in ``classes`` (the file's are ignored)."""
    index = {c: i for i, c in enumerate(classes)}
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read {path}: {err}") from None
    paths, labels = [], []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        parts = PurePosixPath(fields[0]).parts
        if len(fields) > 2 or len(parts) < 2:
            raise UserError(f"{path}:{number}: expected 'domain/class/file.jpg label', got '{line.strip()}'")
        if parts[-2] in index:
            paths.append(str(base.joinpath(*parts)))
            labels.append(index[parts[-2]])
    if not paths:
        raise UserError(f"{path} lists no image of the classes {', '.join(classes)}")
    if not Path(paths[0]).is_file():
        raise UserError(f"{paths[0]} (listed in {path}) not found: the image folders must sit next "
                        "to the list files")
    return paths, labels


def _domain_bundle(cfg: DataConfig, pre: Preprocess, classes: Sequence[str], domains: Sequence[str],
                   splits: list[tuple[Split, Split]]) -> DatasetBundle:
    def merge(which: int) -> FileImages:
        paths, labels, domain_ids = [], [], []
        for domain_id, pair in enumerate(splits):
            split_paths, split_labels = pair[which]
            paths += split_paths
            labels += split_labels
            domain_ids += [domain_id] * len(split_paths)
        return FileImages(paths, labels, domains=domain_ids)

    return _bundle(cfg, pre, [_clean(c) for c in classes], merge(0), merge(1), augment_default=False,
                   domain_names=list(domains))


def build_domainnet(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """DomainNet, 10-class subset over 6 domains, from the official per-domain train/test lists."""
    folder = _root(cfg) / "domainnet"
    how = f"get the images and lists from {DOMAINNET_URL} (torchvision cannot download DomainNet)"
    if not folder.is_dir():
        raise UserError(f"DomainNet not found: expected {folder}/<domain>/<class>/*.jpg with "
                        f"{folder}/<domain>_train.txt and <domain>_test.txt; {how}")
    splits = []
    for domain in DOMAINNET_DOMAINS:
        pair = []
        for split in ("train", "test"):
            path = folder / f"{domain}_{split}.txt"
            if not path.is_file():
                raise UserError(f"DomainNet list not found: {path}; {how}")
            pair.append(read_domain_list(path, folder, DOMAINNET_CLASSES))
        splits.append((pair[0], pair[1]))
    return _domain_bundle(cfg, preprocess, DOMAINNET_CLASSES, DOMAINNET_DOMAINS, splits)


def _office_folder_split(folder: Path, domain_id: int) -> tuple[Split, Split]:
    train: Split = ([], [])
    test: Split = ([], [])
    for label, cls in enumerate(OFFICE_CLASSES):
        class_dir = folder / cls
        if not class_dir.is_dir():
            raise UserError(f"Office-Caltech10 class folder not found: {class_dir}; expected "
                            f"<domain>/<class>/ for the classes {', '.join(OFFICE_CLASSES)}")
        files = sorted(str(p) for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        order = np.random.default_rng([0, domain_id, label]).permutation(len(files))
        n_test = (len(files) + 2) // 5  # 20 %, rounded half up
        for i, position in enumerate(order):
            target = test if i < n_test else train
            target[0].append(files[position])
            target[1].append(label)
    return train, test


def build_office_caltech10(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """Office-Caltech10: 10 classes over 4 domains; list files when present, else a seeded 80/20 split."""
    folder = _root(cfg) / "office_caltech10"
    how = f"get it from {OFFICE_URL} (torchvision cannot download it)"
    splits = []
    for domain_id, domain in enumerate(OFFICE_DOMAINS):
        domain_dir = folder / domain
        if not domain_dir.is_dir():
            raise UserError(f"Office-Caltech10 not found: expected {domain_dir}/<class>/*.jpg "
                            f"(domains {', '.join(OFFICE_DOMAINS)} under {folder}); {how}")
        lists = [folder / f"{domain}_{split}.txt" for split in ("train", "test")]
        present = [p.is_file() for p in lists]
        if all(present):
            pair = tuple(read_domain_list(p, folder, OFFICE_CLASSES) for p in lists)
            splits.append((pair[0], pair[1]))
        elif any(present):
            missing, found = lists[present.index(False)], lists[present.index(True)]
            raise UserError(f"Office-Caltech10: {missing} is missing while {found} exists; provide "
                            "both lists or neither (then a seeded 80/20 split is used)")
        else:
            splits.append(_office_folder_split(domain_dir, domain_id))
    return _domain_bundle(cfg, preprocess, OFFICE_CLASSES, OFFICE_DOMAINS, splits)
