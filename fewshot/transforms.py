"""CLIP image transforms (data.md §4): CLIP mean/std, bicubic interpolation.

Train: RandomResizedCrop(size, scale=crop_scale) -> RandomHorizontalFlip -> ToTensor -> Normalize; ``crop_scale``
       is CoOp's (0.08, 1) unless the trial's ``crop_scale`` setting says otherwise.
Eval:  Resize(size) (shorter side) -> CenterCrop(size) -> ToTensor -> Normalize (= CLIP's preprocess).
"""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


#: CoOp's (torchvision's) RandomResizedCrop area range
DEFAULT_CROP_SCALE = (0.08, 1.0)


def clip_transform(image_size: int, train: bool, crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE):
    """The CoOp/CLIP train or eval transform for square inputs of ``image_size`` pixels (``crop_scale``: the
    training crop's area range, as fractions of the image)."""
    normalize = T.Normalize(CLIP_MEAN, CLIP_STD)
    if train:
        return T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(p=0.5),
                T.ToTensor(),
                normalize,
            ]
        )
    return T.Compose(
        [
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            normalize,
        ]
    )
