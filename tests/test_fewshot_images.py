"""ImageDataset (loading, read counter, errors), CLIP transforms and prompt templates."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from fewshot.errors import ConfigError, DataError, MissingDataError
from fewshot.images import ImageDataset
from fewshot.registry import dataset_names
from fewshot.templates import ensemble_templates, template
from fewshot.transforms import CLIP_MEAN, CLIP_STD, clip_transform
from fewshot.types import Item


def _write(path, colour, size=(40, 40), mode="RGB"):
    Image.new(mode, size, colour).save(path)
    return str(path)


@pytest.fixture
def items(tmp_path):
    return [Item(_write(tmp_path / f"{i}.png", (i * 20, 100, 200)), i % 3, f"c{i % 3}") for i in range(6)]


def test_eval_transform_normalises_with_clip_stats(tmp_path):
    colour = (10, 128, 250)
    img = Image.open(_write(tmp_path / "x.png", colour, size=(64, 40)))
    x = clip_transform(32, train=False)(img)
    assert x.shape == (3, 32, 32)
    expected = (torch.tensor(colour) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 16, 16], expected, atol=1e-5)


def test_transform_steps():
    train = clip_transform(224, train=True).transforms
    assert [type(t) for t in train] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert train[0].scale == (0.08, 1.0) and train[0].interpolation == InterpolationMode.BICUBIC
    assert tuple(train[3].mean) == CLIP_MEAN and tuple(train[3].std) == CLIP_STD
    ev = clip_transform(224, train=False).transforms
    assert [type(t) for t in ev] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert ev[0].interpolation == InterpolationMode.BICUBIC and ev[0].size == 224
    assert clip_transform(48, train=True, crop_scale=(0.5, 1.0)).transforms[0].scale == (0.5, 1.0)


def test_image_dataset_loads_rgb_and_counts_reads(tmp_path, items):
    gray = Item(_write(tmp_path / "g.png", 77, mode="L"), 1, "c1")
    ds = ImageDataset(items + [gray], clip_transform(32, train=True), split="test")
    assert ds.images_read == 0 and len(ds) == 7
    x, y = ds[6]
    assert x.shape == (3, 32, 32) and y == 1 and ds.images_read == 1
    assert ds.split == "test"
    raw = ImageDataset(items, transform=None)
    img, _ = raw[2]
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [40, 100, 200]
    clone = pickle.loads(pickle.dumps(ds))  # e.g. sent to another process through Ray
    assert clone.images_read == 1
    clone[0]
    assert clone.images_read == 2 and ds.images_read == 1
    ds.reset_images_read()
    assert ds.images_read == 0


def test_images_read_counts_dataloader_workers(items):
    ds = ImageDataset(items, clip_transform(32, train=False), split="test")
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [it.label for it in items]
    assert ds.images_read == len(items)


def test_missing_and_corrupt_images_raise_data_error(tmp_path):
    ds = ImageDataset([Item(str(tmp_path / "gone.jpg"), 0, "a")], None)
    with pytest.raises(MissingDataError, match="gone.jpg"):
        ds[0]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="bad.jpg"):
        ImageDataset([Item(str(bad), 0, "a")], None)[0]
    truncated = tmp_path / "trunc.png"
    _write(truncated, (1, 2, 3), size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DataError, match="trunc.png"):
        ImageDataset([Item(str(truncated), 0, "a")], None)[0]


def test_templates():
    assert template("oxford_pets") == "a photo of a {}, a type of pet."
    assert template("dtd") == "{} texture." and template("dtd", "kgcoop") == "a photo of a {}, a type of texture."
    assert template("fgvc_aircraft", "kgcoop") == "a photo of a {}, a type of aircraft."
    assert template("fgvc_aircraft", "sep") == "a photo of an aircraft {}."
    assert template("stanford_cars", "sep") == "a photo of a {}, a type of car."
    assert template("food101") == "a photo of {}, a type of food."
    assert template("food101", "sep") == "a photo of a {}, a type of food."
    assert template("digits") == "a photo of the digit {}." and template("shapes-20") == "a photo of a {}."
    for name in dataset_names():
        for kind in ("coop", "kgcoop", "sep"):
            assert template(name, kind).count("{}") == 1
    assert len(ensemble_templates("imagenet")) == 7 and "a photo of a {}." not in ensemble_templates("imagenet")
    eurosat = ensemble_templates("eurosat")
    assert len(eurosat) == 8 and eurosat[0] == "itap of a {}." and eurosat[-1] == "a centered satellite photo of {}."
    with pytest.raises(ConfigError, match="cifar10"):
        template("cifar10")
    with pytest.raises(ConfigError, match="coop, kgcoop, sep"):
        template("dtd", "clip")


def test_images_read_counts_spawned_workers(items):
    ds = ImageDataset(items, clip_transform(32, train=False), split="test")
    loader = DataLoader(ds, batch_size=3, num_workers=1, multiprocessing_context="spawn")
    assert sum(len(y) for _, y in loader) == len(items)
    assert ds.images_read == len(items)
