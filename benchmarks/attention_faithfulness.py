"""Deletion and insertion scores of every attention-map method, against random maps, on a small ViT trained
briefly on scikit-learn's digits (offline, about a minute on two CPU cores).

    python -m benchmarks.attention_faithfulness [--epochs 30] [--seeds 5] [--steps 16] [--threads 1]

Prints a Markdown table: the mean area under the deletion curve (lower is better) and the insertion curve
(higher is better) over the fixed 360-image test split, with the standard error of the mean.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import vit
from vit.explain import METHODS
from vit.faithfulness import deletion_score, insertion_score

# 8x8 digits upsampled to 16x16: patch 4 gives a 4x4 grid, each patch 2x2 original pixels.
DIGITS_VIT = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=3, num_heads=4)


def digits_tensors(size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), normalised with the training mean and std; the test split is the
    project's fixed one (test_size=0.2, random_state=0, stratified)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="nearest")
    y = torch.tensor(digits.target)
    train, test = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=digits.target)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std  # zero in normalised space is the average pixel: the deletion baseline
    return x[train], y[train], x[test], y[test]


def train_digits_vit(epochs: int = 30, seed: int = 0, batch_size: int = 64, lr: float = 2e-3) -> vit.VisionTransformer:
    """A small ViT trained with AdamW and a one-cycle schedule on the digits training split (eval mode).

    Trains on one thread: a model this small gains little from more, and loses a lot when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs, seed, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(epochs: int, seed: int, batch_size: int, lr: float) -> vit.VisionTransformer:
    torch.manual_seed(seed)
    x, y, _, _ = digits_tensors(DIGITS_VIT["img_size"])
    model = vit.VisionTransformer(vit.ViTConfig(**DIGITS_VIT, mlp_ratio=2.0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    per_epoch = -(-len(y) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * per_epoch, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(batch_size):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def random_maps(x: torch.Tensor, patch_size: int, seed: int) -> torch.Tensor:
    """Uniform random patch scores (B, gh, gw): the baseline every method must beat."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(x.shape[0], x.shape[-2] // patch_size, x.shape[-1] // patch_size, generator=g)


def main(argv: list[str] | None = None) -> None:
    """Train the digits ViT, then print the faithfulness table of every method and of random maps."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5, help="random maps are averaged over this many seeds")
    parser.add_argument("--steps", type=int, default=None, help="curve steps (default: one per patch)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small models run best on one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model = train_digits_vit(args.epochs)
    _, _, x, y = digits_tensors(DIGITS_VIT["img_size"])
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    print(f"digits ViT {DIGITS_VIT}, {args.epochs} epochs: test accuracy {accuracy:.3f} on {len(y)} images")

    kw = dict(steps=args.steps)
    rows = {}
    for method in METHODS:
        maps = vit.explain(model, x, method)
        rows[method] = (deletion_score(model, x, maps, **kw), insertion_score(model, x, maps, **kw))
    patch = DIGITS_VIT["patch_size"]
    rand = [random_maps(x, patch, s) for s in range(args.seeds)]
    rows[f"random (mean of {args.seeds} seeds)"] = tuple(
        torch.stack([score(model, x, m, **kw) for m in rand]).mean(0) for score in (deletion_score, insertion_score)
    )

    print("\n| method | deletion AUC (lower is better) | insertion AUC (higher is better) |")
    print("|---|---|---|")
    for name, (deletion, insertion) in rows.items():
        print(f"| {name} | {_mean_sem(deletion)} | {_mean_sem(insertion)} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


def _mean_sem(v: torch.Tensor) -> str:
    return f"{v.mean():.3f} ± {v.std() / len(v) ** 0.5:.3f}"


if __name__ == "__main__":
    main()
