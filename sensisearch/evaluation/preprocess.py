"""Image preprocessing presets: how a decoded image becomes the model's float input.

Two steps, kept apart so one decoded copy of the data serves calibration and
evaluation:

1. :meth:`Preprocess.fit` (once per image, at load time): uint8 RGB HWC of any
   size -> uint8 RGB HWC of the model's input size.

   - ``raw``: resize straight to the input size (what sensisearch always did).
   - ``imagenet``: resize the shorter side to ``round(size / crop_fraction)``
     (bilinear), then centre-crop to the input size: torchvision/timm's
     ``Resize(256) + CenterCrop(224)`` evaluation transform, crop_fraction 0.875.
   - ``yolo``: YOLOv5 v7.0 letterbox (long side, pad 114; :mod:`.letterbox`).

2. :meth:`Preprocess.apply` (per batch): ``(pixel * scale - mean) / std`` per
   channel, RGB or BGR channel order, NCHW or NHWC layout, float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.evaluation.letterbox import PAD_VALUE

if TYPE_CHECKING:
    from sensisearch.model.tensor import TensorSpec

PreprocessKind = Literal["raw", "imagenet", "yolo"]
PRESETS: tuple[str, ...] = ("raw", "imagenet", "yolo")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CROP_FRACTION = 0.875
"""torchvision/timm's evaluation rule: resize to 256, crop 224 (224 / 256)."""


@dataclass(frozen=True)
class InputGeometry:
    """Where the channel axis of a 4-D image input is, and its sizes."""

    layout: Literal["nchw", "nhwc"]
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class Preprocess:
    """x = (pixel * scale - mean) / std, per channel, after the preset's resize.

    ``layout=None`` takes the layout from the model input (NHWC when its last
    dimension is 1 or 3 and its second is not). ``mean``/``std`` are in the
    order of the model's channels (i.e. already BGR-ordered for a BGR model).
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    kind: PreprocessKind = "raw"
    channel_order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] | None = None
    crop_fraction: float = IMAGENET_CROP_FRACTION
    """``imagenet`` only: the input size divided by the shorter-side resize."""
    pad_value: int = PAD_VALUE
    """``yolo`` only: letterbox border value."""

    def __post_init__(self) -> None:
        if self.kind not in PRESETS:
            raise SensisearchError(f"--preprocess {self.kind}: unknown preset; use one of {', '.join(PRESETS)}")
        if self.channel_order not in ("rgb", "bgr"):
            raise SensisearchError(f"--channel-order {self.channel_order}: use rgb or bgr")
        if self.layout not in (None, "nchw", "nhwc"):
            raise SensisearchError(f"--layout {self.layout}: use nchw or nhwc")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise SensisearchError(f"--crop-fraction {self.crop_fraction}: must be in (0, 1]")

    @classmethod
    def preset(cls, kind: PreprocessKind, **overrides: object) -> "Preprocess":
        """A preset with its usual normalisation (imagenet: ImageNet mean/std), then ``overrides``."""
        base: dict[str, object] = {"kind": kind}
        if kind == "imagenet":
            # mean/std are in the model's channel order: reversed for a BGR model.
            bgr = overrides.get("channel_order") == "bgr"
            base.update(mean=IMAGENET_MEAN[::-1] if bgr else IMAGENET_MEAN, std=IMAGENET_STD[::-1] if bgr else IMAGENET_STD)
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """Everything the preprocessed tensor depends on, for the study's identity and cache keys."""
        return {
            "kind": self.kind,
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": self.scale,
            "channel_order": self.channel_order,
            "layout": self.layout or "auto",
            "crop_fraction": self.crop_fraction if self.kind == "imagenet" else None,
            "pad_value": self.pad_value if self.kind == "yolo" else None,
        }

    # ------------------------------------------------------------------ geometry
    def geometry(self, spec: "TensorSpec", source: object = "the data") -> InputGeometry:
        """Channels and spatial size of a static 4-D image input, in this layout."""
        shape = spec.shape
        if len(shape) != 4 or any(d is None for d in shape[1:]):
            raise SensisearchError(
                f"model input '{spec.name}' has shape {list(shape)}; image data needs a static [N,C,H,W] "
                f"or [N,H,W,C] input ({source}); pass preprocessed tensors as .npy/.npz instead"
            )
        layout = self.layout
        if layout is None:
            layout = "nhwc" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "nchw"
        if layout == "nchw":
            c, h, w = shape[1], shape[2], shape[3]
        else:
            h, w, c = shape[1], shape[2], shape[3]
        return InputGeometry(layout, int(c), int(h), int(w))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ step 1: per image
    def fit(self, image: np.ndarray, height: int, width: int) -> np.ndarray:
        """uint8 HWC image (RGB or gray) of any size -> uint8 HWC of ``height`` x ``width``."""
        import cv2  # lazily: only decoded image files need it

        if image.ndim == 2:
            image = image[..., None]
        h0, w0 = image.shape[:2]
        if self.kind == "yolo":
            from sensisearch.evaluation.letterbox import letterbox, resize_long_side

            resized = resize_long_side(image, (height, width))
            out, _, _ = letterbox(resized, (height, width), pad_value=self.pad_value, scaleup=False)
        elif self.kind == "imagenet":
            out = _resize_shorter_and_centre_crop(image, height, width, self.crop_fraction)
        else:
            out = image
            if (h0, w0) != (height, width):
                interpolation = cv2.INTER_AREA if h0 > height else cv2.INTER_LINEAR
                out = cv2.resize(image, (width, height), interpolation=interpolation)
        if out.ndim == 2:
            out = out[..., None]
        return out

    # ------------------------------------------------------------------ step 2: per batch
    def apply(self, images_nhwc: np.ndarray, layout: Literal["nchw", "nhwc"] | None = None) -> np.ndarray:
        """uint8 NHWC (RGB) -> float32 in the model's channel order and layout (default NCHW)."""
        if self.kind == "yolo" and self.scale == 1.0 / 255.0:
            # Divide, as YOLOv5 and the detector's tensor store do: x * (1/255) can differ by one ulp.
            x = np.divide(images_nhwc, np.float32(255.0), dtype=np.float32)
        else:
            x = images_nhwc.astype(np.float32) * np.float32(self.scale)
        channels = x.shape[-1]
        if self.channel_order == "bgr" and channels == 3:
            x = x[..., ::-1]
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        if mean.size not in (1, channels) or std.size not in (1, channels):
            raise SensisearchError(
                f"--mean/--std have {mean.size}/{std.size} values but the images have {channels} channel(s); "
                "give one value or one per channel"
            )
        x = (x - mean) / std
        if (layout or self.layout or "nchw") == "nhwc":
            return np.ascontiguousarray(x)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _resize_shorter_and_centre_crop(image: np.ndarray, height: int, width: int, crop_fraction: float) -> np.ndarray:
    """torchvision ``Resize(int(size / crop_fraction))`` + ``CenterCrop(size)`` on a PIL image.

    PIL's bilinear resize (antialiased when shrinking) is what torchvision runs on
    PIL images, so it is used rather than ``cv2.INTER_LINEAR``, which does not
    antialias and would change the input distribution the weights were trained on.
    """
    from PIL import Image

    h0, w0 = image.shape[:2]
    # timm: scale_size = floor(img_size / crop_pct); torchvision's references use 256 for 224.
    short = int(np.floor(max(height, width) / crop_fraction))
    if w0 <= h0:
        new_w, new_h = short, int(short * h0 / w0)
    else:
        new_h, new_w = short, int(short * w0 / h0)  # torchvision: long side = int(size * long / short)
    channels = image.shape[2]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
    if resized.ndim == 2:
        resized = resized[..., None]
    if new_h < height or new_w < width:
        raise SensisearchError(f"imagenet preprocessing: resized image {new_h}x{new_w} is smaller than the crop {height}x{width}")
    # torchvision CenterCrop: top = int(round((h - ch) / 2.0)).
    top = int(round((new_h - height) / 2.0))
    left = int(round((new_w - width) / 2.0))
    return np.ascontiguousarray(resized[top : top + height, left : left + width])
