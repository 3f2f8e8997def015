"""Train and export the bundled ``--example digits`` model.

A small ResNet-style CNN on scikit-learn's handwritten digits (1797 real scanned
8x8 images, 10 classes, shipped with scikit-learn -- no download), bilinearly
upscaled to 32x32 so the convolutions are large enough for INT8 to be measurably
faster than FP32 on ONNX Runtime's CPU provider.

The clean digits are too easy (99.6 % Top-1; every INT8 configuration scores the
same), so the task is the digits under realistic capture distortions: a random
affine (rotation, anisotropic scale, shear, shift), a Gaussian blur, reduced
contrast on a grey background, and Gaussian sensor noise (see ``distort``).
Training draws fresh distortions every step; the evaluation and calibration sets
are fixed, seeded distorted copies.

Run from the repository root (torch is a dev/train-only dependency; the
``sensisearch`` package itself never imports it)::

    python -m sensisearch.examples.digits.train

Outputs (next to this file): ``digits_resnet.onnx`` (FP32, Conv+BN fused,
input ``input`` [N,1,32,32], output ``logits`` [N,10]), ``calib.npz``,
``eval.npz`` (``images`` uint8 [N,32,32], ``labels`` int64 [N]) and
``example.json`` (preprocessing: ``x = (pixel/255 - mean) / std``).

Split (fixed, seeded, stratified over the 1797 source images): NUM_EVAL_SOURCES
source images are held out; the evaluation set is EVAL_COPIES distorted copies
of each. The remaining source images are the training set; the calibration set
is one distorted copy each of NUM_CALIB of them (seeded choice). Calibration
data drawn from the training distribution is the usual practice (e.g.
TensorRT's recommendation); it never shares a source image with the evaluation
set.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESOLUTION = 32
MEAN = 0.5
STD = 0.5
NUM_EVAL_SOURCES = 500
EVAL_COPIES = 4
NUM_CALIB = 512
SEED = 0
EVAL_SEED = 1001
CALIB_SEED = 2002
# Distortion ranges (uniform, contrast log-uniform): see ``distort``.
DISTORTION = {
    "rotation_deg": 20.0,       # +-
    "scale": (0.8, 1.2),        # per axis
    "shear": 0.2,               # +- (x shear: slant of the handwriting)
    "shift_px": 3.5,            # +- at 32x32
    "blur_sigma_px": (0.0, 1.5),
    "background": (0.0, 0.3),   # background grey level
    "contrast": (0.03, 1.0),    # ink minus background ("exposure"), log-uniform; ink clipped at 1
    "noise_sigma": (0.0, 0.04), # additive Gaussian sensor noise
}
WIDTHS = (24, 48, 96)
EPOCHS = 30
CLASS_NAMES = [str(i) for i in range(10)]


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def load_sources(resolution: int = RESOLUTION, seed: int = SEED):
    """Clean source images, upscaled: ((train uint8 [N,H,W], int64 [N]), (held-out images, labels))."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) * (255.0 / 16.0)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    with torch.no_grad():
        up = F.interpolate(
            torch.from_numpy(images)[:, None], size=(resolution, resolution), mode="bilinear", align_corners=False
        )[:, 0].numpy()
    up = np.clip(np.rint(up), 0, 255).astype(np.uint8)

    idx = np.arange(len(labels))
    train_idx, eval_idx = train_test_split(idx, test_size=NUM_EVAL_SOURCES, stratify=labels, random_state=seed)
    eval_idx = np.sort(eval_idx)
    train_idx = np.random.default_rng(seed).permutation(np.sort(train_idx))
    return (up[train_idx], labels[train_idx]), (up[eval_idx], labels[eval_idx])


def load_split(resolution: int = RESOLUTION, seed: int = SEED, distortion: dict | None = None):
    """Return (train sources, calib, eval) as (uint8 images [N,H,W], int64 labels [N]).

    The training set is clean source images (distorted on the fly while training);
    calib and eval are fixed, seeded distorted copies.
    """
    import torch

    (tr_x, tr_y), (ho_x, ho_y) = load_sources(resolution, seed)
    # Evaluation: EVAL_COPIES distorted copies of every held-out source image, copy-major.
    gen = torch.Generator().manual_seed(EVAL_SEED)
    ev_x = np.concatenate([distort_u8(ho_x, gen, distortion) for _ in range(EVAL_COPIES)])
    ev_y = np.concatenate([ho_y] * EVAL_COPIES)
    # Calibration: one distorted copy each of NUM_CALIB training source images.
    gen = torch.Generator().manual_seed(CALIB_SEED)
    pick = np.sort(np.random.default_rng(CALIB_SEED).choice(len(tr_y), NUM_CALIB, replace=False))
    ca_x, ca_y = distort_u8(tr_x[pick], gen, distortion), tr_y[pick]
    return (tr_x, tr_y), (ca_x, ca_y), (ev_x, ev_y)


def build_model(widths=WIDTHS, num_classes: int = 10):
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu2 = nn.ReLU()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu1(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu2(out + identity)

    class DigitsResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c1, c2, c3 = widths
            self.stem = nn.Sequential(nn.Conv2d(1, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
            self.layer1 = BasicBlock(c1, c1, 1)
            self.layer2 = BasicBlock(c1, c2, 2)
            self.layer3 = BasicBlock(c2, c3, 2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(c3, num_classes)

        def forward(self, x):
            x = self.layer3(self.layer2(self.layer1(self.stem(x))))
            return self.fc(self.pool(x).flatten(1))

    return DigitsResNet()


def fuse_conv_bn(model):
    """Return an eval-mode copy with every BatchNorm folded into its Conv."""
    import copy

    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()

    def _fuse(module):
        names = list(module._modules.keys())
        for i, name in enumerate(names):
            child = module._modules[name]
            if isinstance(child, nn.BatchNorm2d):
                continue
            _fuse(child)
        # pairs (convX, bnX) as attributes, and consecutive Conv/BN in Sequentials
        for name in names:
            child = module._modules[name]
            if isinstance(child, nn.Conv2d):
                bn_name = name.replace("conv", "bn")
                if isinstance(module, nn.Sequential):
                    nxt = names[names.index(name) + 1] if names.index(name) + 1 < len(names) else None
                    bn_name = nxt
                bn = module._modules.get(bn_name) if bn_name else None
                if isinstance(bn, nn.BatchNorm2d):
                    module._modules[name] = fuse_conv_bn_eval(child, bn)
                    module._modules[bn_name] = nn.Identity()

    _fuse(model)
    return model


def distort(x, gen, distortion: dict | None = None):
    """Realistic capture distortions of a batch ``x`` float [N,1,H,W], ink 1 on background 0.

    Per image (all ranges uniform, see ``DISTORTION``): an affine warp (rotation,
    per-axis scale, x shear, shift), a Gaussian blur, contrast (ink level on a grey
    background level), additive Gaussian noise; the result is clipped to 0..1 and
    rounded to 8-bit levels, as a camera/scanner would store it. Deterministic for
    a given ``torch.Generator`` state.
    """
    import math

    import torch
    import torch.nn.functional as F

    d = DISTORTION if distortion is None else distortion
    n, _, h, w = x.shape

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    ang = u(-1, 1) * math.radians(d["rotation_deg"])
    sx, sy = u(*d["scale"]), u(*d["scale"])
    shear = u(-d["shear"], d["shear"])
    shift = u(-1, 1, 2) * (2 * d["shift_px"] / w)  # normalized coordinates span 2
    # forward map A = R(ang) @ Shear @ S; affine_grid wants output->input, i.e. A^-1
    cos, sin = torch.cos(ang), torch.sin(ang)
    a11, a12 = cos * sx, (cos * shear - sin) * sy
    a21, a22 = sin * sx, (sin * shear + cos) * sy
    det = a11 * a22 - a12 * a21
    inv = torch.stack([torch.stack([a22, -a12], 1), torch.stack([-a21, a11], 1)], 1) / det[:, None, None]
    t = -(inv @ shift[:, :, None])
    theta = torch.cat([inv, t], 2)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Gaussian blur, per-image sigma (sigma 0 -> identity kernel)
    sigma = u(*d["blur_sigma_px"]).clamp_min(1e-3)
    r = torch.arange(-3, 4, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (r[None] / sigma[:, None]) ** 2)
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :])[:, None]  # [N,1,7,7]
    x = F.conv2d(F.pad(x.reshape(1, n, h, w), (3, 3, 3, 3), mode="replicate"), k2, groups=n).reshape(n, 1, h, w)
    # contrast: background level b, ink level b + c
    b = u(*d["background"])[:, None, None, None]
    lo, hi = d["contrast"]  # exposure is multiplicative: log-uniform
    c = torch.exp(u(math.log(lo), math.log(hi)))[:, None, None, None]
    x = b + c * x
    x = x + u(*d["noise_sigma"])[:, None, None, None] * torch.randn(x.shape, generator=gen)
    return torch.round(x.clamp(0, 1) * 255) / 255


def distort_u8(images_u8: np.ndarray, gen, distortion: dict | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        x = torch.from_numpy(images_u8.astype(np.float32) / 255.0)[:, None]
        out = distort(x, gen, distortion)[:, 0].numpy()
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def normalize(x01):
    """torch float 0..1 -> model input."""
    return (x01 - MEAN) / STD


def preprocess(images_u8: np.ndarray) -> np.ndarray:
    return ((images_u8.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]


def train(
    epochs: int = EPOCHS,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = SEED,
    out_dir: Path = HERE,
    widths=WIDTHS,
    distortion: dict | None = None,
) -> dict:
    import torch
    import torch.nn as nn

    torch.set_num_threads(max(1, torch.get_num_threads()))
    _seed_everything(seed)
    (tr_x, tr_y), (ca_x, ca_y), (ev_x, ev_y) = load_split(seed=seed, distortion=distortion)
    xt = torch.from_numpy(tr_x.astype(np.float32) / 255.0)[:, None]  # clean sources, 0..1
    yt = torch.from_numpy(tr_y)
    xe = torch.from_numpy(preprocess(ev_x))
    model = build_model(widths)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            b = perm[i * batch_size : (i + 1) * batch_size]
            xb = normalize(distort(xt[b], gen, distortion))
            loss = loss_fn(model(xb), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        if epoch % 5 == 4 or epoch == epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(xe).argmax(1).numpy() == ev_y).mean()
            print(f"epoch {epoch + 1:3d} loss {total / len(xt):.4f} eval top1 {acc:.4f} ({time.time() - t0:.0f}s)")

    fused = fuse_conv_bn(model)
    with torch.no_grad():
        acc_fused = float((fused(xe).argmax(1).numpy() == ev_y).mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "digits_resnet.onnx"
    export_onnx(fused, onnx_path)
    np.savez_compressed(out_dir / "calib.npz", images=ca_x, labels=ca_y)
    np.savez_compressed(out_dir / "eval.npz", images=ev_x, labels=ev_y)
    meta = {
        "mean": [MEAN],
        "std": [STD],
        "input": "input",
        "output": "logits",
        "input_shape": [1, RESOLUTION, RESOLUTION],
        "num_classes": 10,
        "class_names": CLASS_NAMES,
    }
    (out_dir / "example.json").write_text(json.dumps(meta, indent=2) + "\n")
    acc_onnx = _check_onnx(onnx_path, ev_x, ev_y)
    print(f"fused torch top1 {acc_fused:.4f}; ONNX Runtime FP32 top1 {acc_onnx:.4f}")
    return {"top1_torch": acc_fused, "top1_onnx": acc_onnx}


def export_onnx(model, path: Path, opset: int = 13) -> None:
    import onnx
    import torch

    dummy = torch.zeros(1, 1, RESOLUTION, RESOLUTION)
    kwargs = dict(
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        do_constant_folding=True,
    )
    try:
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, **kwargs)
    except TypeError:  # older torch without the dynamo switch
        torch.onnx.export(model, (dummy,), str(path), **kwargs)
    m = onnx.load(str(path))
    # The exporter de-duplicates equal initializers through Identity nodes; give every
    # consumer its own initializer instead so that each Conv's bias is an initializer.
    from onnx import numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    keep = []
    for node in m.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]]).copy()
            m.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    # Stable, unique, readable node names: "<module path>/<OpType>", e.g. "layer2/conv1/Conv".
    seen: dict[str, int] = {}
    for node in m.graph.node:
        base = node.name.strip("/") or node.op_type
        parts = [p for p in base.split("/") if p]
        # legacy exporter names look like /layer1/layer1.0/conv1/Conv -> drop duplicated prefixes
        cleaned = []
        for p in parts:
            if cleaned and p.startswith(cleaned[-1] + "."):
                p = p[len(cleaned[-1]) + 1 :]
            cleaned.append(p)
        name = "/".join(cleaned)
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        node.name = name
    m.producer_name = "sensisearch.examples.digits.train"
    del m.metadata_props[:]
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _check_onnx(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": preprocess(images)})[0]
    return float((logits.argmax(1) == labels).mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--out-dir", type=Path, default=HERE)
    args = p.parse_args(argv)
    train(epochs=args.epochs, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
