"""Datasets for accuracy runs, in their real on-disk formats.

* ``synthetic`` (smoke): a tiny ImageFolder of random PNGs, generated under the data root.
* ``digits`` (mini): scikit-learn's bundled 1,797 real 8x8 digit scans, written once as an ImageFolder (PNG) under
  the data root, split 80/20 by a fixed permutation, resized at load time.
* ``synthetic_cifar`` (smoke) / ``digits_cifar`` (mini): the same images written as CIFAR-100 python pickles
  (``train`` / ``test`` with ``data`` and ``fine_labels``) and read by the CIFAR reader, for tables whose paper data is
  CIFAR (RepOptimizers' Hyper-Search): the real format at a size this machine trains. No flip or crop (digits are not
  mirror-symmetric; mini's digits recipe augments nothing).
* ``imagenet``: ``<root>/imagenet/{train,val}/<class>/*`` (ImageFolder). ``cifar10`` / ``cifar100``: the python
  pickle batches in ``<root>/cifar-10-batches-py`` / ``<root>/cifar-100-python``. These are never downloaded: if
  missing, :class:`DatasetMissing` says where they were expected.
* ``caltech256``: ``<root>/caltech256/{train,val}/<class>/*`` (ImageFolder, 257 classes with the clutter class),
  read as ImageNet is. Caltech-256 has no official split: the user's ``train`` / ``val`` folders are the split (the
  RepOptimizers paper does not give its own).
* ``imagewoof``: ``<root>/imagewoof/{train,val}/<class>/*`` (ImageFolder, the 10 dog classes of fast.ai's ImageWoof;
  its own train / val split), read as ImageNet is (RepNeXt Table 2).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

EXTERNAL = {"imagenet": "imagenet", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
            "caltech256": "caltech256", "imagewoof": "imagewoof"}
IMAGEFOLDERS = ("imagenet", "caltech256", "imagewoof")  # external ImageFolder trees with train/ and val/
TRAIN_IMAGES = {"imagenet": 1_281_167, "cifar10": 50_000, "cifar100": 50_000, "imagewoof": 9_025}  # for plans' device-hour estimates
NUM_CLASSES = {"synthetic": 4, "digits": 10, "synthetic_cifar": 4, "digits_cifar": 10, "imagenet": 1000,
               "cifar10": 10, "cifar100": 100, "caltech256": 257, "imagewoof": 10}
GENERATED_CIFAR = {"synthetic_cifar": "synthetic", "digits_cifar": "digits"}  # CIFAR-format copy -> its source
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DatasetMissing(FileNotFoundError):
    """An external dataset (ImageNet, CIFAR) is not where the data root says it is."""


def resolve_data_root(data_root: str | None) -> Path:
    """``--data-root``, else ``$REPBENCH_DATA``, else ``data/`` in the working directory."""
    return Path(data_root or os.environ.get("REPBENCH_DATA") or "data")


def check_dataset(name: str, root: Path) -> None:
    """Raise :class:`DatasetMissing` for an external dataset that is not on disk (generated ones are fine)."""
    if name in EXTERNAL:
        path = root / EXTERNAL[name]
        if name in IMAGEFOLDERS:
            ok = (path / "train").is_dir() and (path / "val").is_dir()
        else:
            ok = path.is_dir()
        if not ok:
            raise DatasetMissing(f"{name} not found at {path} (point --data-root or $REPBENCH_DATA at a directory "
                                 f"holding {EXTERNAL[name]}/; nothing is downloaded)")
    elif name not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {name!r}")


def _write_imagefolder(root: Path, images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int) -> None:
    """Write uint8 HxW(x3) images as PNGs into root/{train,val}/<label>/, atomically (a temp dir renamed). Workers
    that generate the same data at once all write the same images: the first rename wins, the others drop theirs."""
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    for rank, index in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = tmp / split / f"{int(labels[index]):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).convert("RGB").save(folder / f"{index:05d}.png")
    _publish(tmp, root)


def _publish(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` folder to ``path``; where another worker got there first, drop ours."""
    try:
        tmp.rename(path)
    except OSError:
        if not path.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_synthetic(root: Path) -> Path:
    path = root / "synthetic"
    if not path.is_dir():
        rng = np.random.default_rng(0)
        n = NUM_CLASSES["synthetic"] * 4
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        _write_imagefolder(path, images, np.arange(n) % NUM_CLASSES["synthetic"], 0.5, 0)
    return path


def ensure_cifar_copy(name: str, root: Path) -> Path:
    """``root/<name>``: the generated ImageFolder ``GENERATED_CIFAR[name]`` rewritten as CIFAR-100 pickles (32x32 RGB
    rows, R then G then B planes; its own train/val split kept), atomically like the PNGs."""
    import pickle
    path = root / name
    if path.is_dir():
        return path
    source = ensure_synthetic(root) if GENERATED_CIFAR[name] == "synthetic" else ensure_digits(root)
    tmp = root / f"{name}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for split, file in (("train", "train"), ("val", "test")):
        files = sorted((source / split).glob("*/*.png"))
        data = np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.BILINEAR))
                         .transpose(2, 0, 1).reshape(-1) for f in files])
        labels = [int(f.parent.name) for f in files]
        with open(tmp / file, "wb") as handle:
            pickle.dump({"data": data, "fine_labels": labels, "filenames": [f.name for f in files]}, handle)
    _publish(tmp, path)
    return path


def ensure_digits(root: Path) -> Path:
    path = root / "digits"
    if not path.is_dir():
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 8x8, values 0..16
        _write_imagefolder(path, images, digits.target, 0.2, 0)
    return path


def build_datasets(name: str, root: Path, resolution: int, eval_crop: float = 0.875,
                   eval_resolution: int | None = None, randaugment: int | None = None):
    """(train, val) torchvision datasets yielding (CHW float tensor, label). ImageNet evaluation resizes to
    ``eval_resolution / eval_crop`` and centre-crops ``eval_resolution`` (default: ``resolution``; 256 -> 224, as
    the official code); the other datasets evaluate at ``eval_resolution`` too. ``randaugment``: ImageNet-style
    training adds torchvision's RandAugment (2 ops, this magnitude of 31 bins) after the crop and flip."""
    eval_resolution = eval_resolution or resolution
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(MEAN, STD)
    check_dataset(name, root)
    if name in IMAGEFOLDERS:
        augment = [transforms.RandAugment(2, randaugment, 31)] if randaugment else []
        train_tf = transforms.Compose([transforms.RandomResizedCrop(resolution), transforms.RandomHorizontalFlip(),
                                       *augment, transforms.ToTensor(), normalize])
        val_tf = transforms.Compose([transforms.Resize(round(eval_resolution / eval_crop)),
                                     transforms.CenterCrop(eval_resolution), transforms.ToTensor(), normalize])
        base = root / EXTERNAL[name]
        return datasets.ImageFolder(base / "train", train_tf), datasets.ImageFolder(base / "val", val_tf)
    if name in ("cifar10", "cifar100"):
        train_tf = transforms.Compose([transforms.Resize(resolution), transforms.RandomCrop(resolution, resolution // 8),
                                       transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
        val_tf = transforms.Compose([transforms.Resize(eval_resolution), transforms.ToTensor(), normalize])
        base = root / EXTERNAL[name]
        return CifarPickles(base, name, True, train_tf), CifarPickles(base, name, False, val_tf)
    tf, val_tf = (transforms.Compose([transforms.Resize(r), transforms.ToTensor(), normalize])
                  for r in (resolution, eval_resolution))
    if name in GENERATED_CIFAR:
        base = ensure_cifar_copy(name, root)
        return CifarPickles(base, "cifar100", True, tf), CifarPickles(base, "cifar100", False, val_tf)
    path = ensure_synthetic(root) if name == "synthetic" else ensure_digits(root)
    return datasets.ImageFolder(path / "train", tf), datasets.ImageFolder(path / "val", val_tf)


class CifarPickles:
    """CIFAR-10/100 from the python pickle batches (``data``: N x 3072 uint8 rows, R then G then B planes).
    torchvision's reader is not used because it checks the files against the official MD5 sums."""

    def __init__(self, base: Path, name: str, train: bool, transform):
        import pickle
        files = ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]) if name == "cifar10" \
            else (["train"] if train else ["test"])
        data, labels = [], []
        for file in files:
            if not (base / file).is_file():
                raise DatasetMissing(f"{name} batch {base / file} is missing")
            with open(base / file, "rb") as handle:
                batch = pickle.load(handle, encoding="latin1")
            data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(batch["labels"] if "labels" in batch else batch["fine_labels"])
        self.data, self.targets, self.transform = np.concatenate(data), list(labels), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]
