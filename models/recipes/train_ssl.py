#!/usr/bin/env python3
"""Train a self-supervised encoder on Fashion-MNIST and export it as a qscore model.

One backbone for every method: a ResNet-18 adapted to 28 x 28 greyscale images (3x3 stem,
stride 1, no max-pool; four stages of two BasicBlocks, widths w, 2w, 4w, 8w). The representation
is the global average pool of the last stage, after its ReLU, so it is non-negative, as the
paper's ResNets are. Projector and predictor heads are trained and dropped at export.

Methods: simclr, byol, vicreg, barlow_twins, simsiam, moco (v2), swav, dino: the eight the
Q-Score paper studies. No label is used in training; labels are used once at the end, by the
linear probe on the frozen encoder (train split -> t10k), which is what the model's README
reports. Every method shares the backbone, the data, the two augmented 28 x 28 views per image
(`augment`), batch 512, AdamW (lr 2e-3, weight decay 1e-6) with a linear warm-up over the first
10% of the steps and a cosine decay, and the export. At 3 epochs that is about 350 steps, three
orders of magnitude fewer than the papers' ImageNet schedules, and that drives most of the
choices below. Heads are scaled to the 128-d representation (hidden 512 where the papers use 2048).

SimSiam (Chen & He 2021). Projector: three linear layers, BN on each, the last BN affine-free
(as in the paper's code); predictor: the paper's bottleneck at ratio 4 (512 -> 128 -> 512);
symmetric negative cosine, stop-gradient on the projection. The paper trains the predictor at a
constant learning rate; here it shares the cosine schedule (the paper reports that the decayed
predictor also works, slightly worse).

MoCo v2 (He et al. 2020; Chen et al. 2020). InfoNCE of a query against its own key and a queue
of past keys; keys come from a momentum (EMA) copy of encoder and head; head fc-ReLU-fc without
BN (v2's MLP), 128-d; temperature 0.2 (v2). Queue 4,096 keys (8 batches, 7% of the 60,000
images): the paper's 65,536 is 5% of ImageNet, and more keys than our training images would put
stale copies of a query's own image among its negatives; MoCo v1's ablation loses under a point
going from 65,536 to 4,096. Momentum 0.99, constant: the paper's 0.999 has a time constant of
1,000 steps, so over our ~350 the key encoder would barely leave its initialisation; v1's
ablation shows 0.99 still trains (0.9 does not). Asymmetric loss, one query view and one key
view per image, as v2 has it (the symmetrised loss is MoCo v3's), which makes a step cheaper
than SimCLR's. Shuffling BN (the paper's guard against a query and its key sharing batch
statistics, one BN per GPU) is emulated: queries run in 4 sub-batches of 128, keys in 4
sub-batches of a shuffled batch, and the shuffle is undone afterwards.

SwAV (Caron et al. 2020). Each view's code, computed by Sinkhorn-Knopp over the batch (eps 0.05,
3 iterations: the paper's values), is predicted by the other view's softmax over the prototype
scores at temperature 0.1 (the paper's). 100 prototypes: the paper uses 3,000 for ImageNet's
1,000 classes and reports little sensitivity from a few hundred up; with 10 classes and a
batch of 512, 100 keeps Sinkhorn's equal-share constraint meaningful (about 5 images per
prototype per batch). Prototypes are re-normalised to the unit sphere after every step and kept
frozen for the first 10% of the steps (the paper freezes them for its first epoch). No queue:
the paper adds one only for batches of 256 or fewer against 3,000 prototypes. No multi-crop:
the paper's 2 x 224 + 6 x 96 crops are one of its main gains, but they would roughly double a
step's cost and make SwAV's augmentation differ from every other method here; both views are
the shared 28 x 28 ones.

DINO (Caron et al. 2021), on the same ResNet backbone (the paper also trains ResNet-50). Head:
three linear layers (BN and ReLU between them, the paper's use_bn_in_head form) to a 128-d
bottleneck, L2-normalised, then a weight-normalised last layer with its norm fixed to 1 (the
paper's norm_last_layer) to 4,096 outputs (the paper's 65,536 is for 1.28M images; 4,096 is
what small-dataset reproductions such as solo-learn's CIFAR setting use). Student temperature
0.1, teacher temperature 0.04 (the paper's starting value; its warm-up to 0.07 spans 30 epochs,
longer than this whole run), centre momentum 0.9 (the paper's). Teacher: EMA of the student,
tau 0.99 -> 1 on a cosine (the paper's 0.996 has a 250-step time constant; 0.99 is BYOL's here).
Two global views and no multi-crop (see SwAV); each student view is matched to the teacher's
output on the other view, as DINO does for its global crops. No last-layer freezing in the
first epoch (a ViT stability measure that would cover a third of this run) and a constant
weight decay (the paper's 0.04 -> 0.4 schedule is for ViTs).

Data: Debian's `dataset-fashion-mnist` (IDX files under /usr/share/datasets/fashion-mnist/).

Outputs, under --out (default models/fmnist-<method>): model.onnx (opset 17, dynamic batch),
model.toml, README.md (provenance and results), train_log.json, golden.json (PyTorch
embeddings of the first committed fixture of every class, for qscore's own Rust test).

Repeatable, not bit-reproducible: the same --seed, --epochs and --threads give the same data
order, augmentations and schedule (all randomness flows from seeded generators), but PyTorch's
CPU kernels are not deterministic across runs here: a BYOL rerun's first-epoch loss differed in
the third digit and its probe by 0.7 points (models/fmnist-byol/README.md).

--checkpoint FILE also saves the shipped epoch's whole method (heads included) for
models/recipes/finetune_qscore.py.

Choosing the number of epochs without touching t10k (t10k is qscore's calibration hold-out):
`--val-fraction 0.1 --choose-epochs 3,5,10` trains once, to the largest candidate, on every
training image (labels unused, as always); at the end of each candidate epoch it fits the probe
on the training images outside a seeded 10% validation split and measures it on that split,
keeps the encoder of the best epoch (the earliest among equals) and records the curve in
train_log.json under "epoch_choice". The learning-rate schedule is the one of the largest
candidate, so the checkpoint at epoch 5 of a 10-epoch run is not the model a 5-epoch run makes.

Usage (`make train-env` makes .venv-train: Debian's CPU PyTorch and scikit-learn plus
onnxruntime; `make ssl-models` trains every bundled one, SSL_METHODS in the Makefile):
  .venv-train/bin/python -s models/recipes/train_ssl.py --method simclr --epochs 3
  .venv-train/bin/python -s models/recipes/train_ssl.py --method byol --val-fraction 0.1 --choose-epochs 3,5,10
"""
import argparse
import copy
import gzip
import json
import math
import pathlib
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = 0.2860, 0.3530
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
DATA = pathlib.Path("/usr/share/datasets/fashion-mnist")
METHODS = ["simclr", "byol", "vicreg", "barlow_twins", "simsiam", "moco", "swav", "dino"]


def load_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fmnist(split):
    prefix = "train" if split == "train" else "t10k"
    x = load_idx(DATA / f"{prefix}-images-idx3-ubyte.gz")
    y = load_idx(DATA / f"{prefix}-labels-idx1-ubyte.gz")
    return x, y


# ---------------------------------------------------------------- backbone

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18Small(nn.Module):
    """ResNet-18 for 28x28 greyscale: 3x3 stem, no max-pool; output = pooled last stage (8w)."""

    def __init__(self, width):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.dim = cin

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


def mlp(dims, last_bn=False):
    layers = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]), nn.ReLU()]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- methods

class SimCLR(nn.Module):
    """Chen et al. 2020: NT-Xent over 2N views, temperature 0.5."""

    def __init__(self, enc, temperature=0.5):
        super().__init__()
        self.enc, self.proj, self.t = enc, mlp([enc.dim, 512, 128]), temperature

    def loss(self, x1, x2):
        z = F.normalize(self.proj(self.enc(torch.cat([x1, x2]))), dim=1)
        n = x1.shape[0]
        sim = z @ z.t() / self.t
        sim.fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, target)

    def after_step(self, progress):
        pass


class BYOL(nn.Module):
    """Grill et al. 2020: online predictor regresses an EMA target; tau 0.99 -> 1 (cosine)."""

    def __init__(self, enc, tau=0.99):
        super().__init__()
        self.enc, self.proj = enc, mlp([enc.dim, 512, 128])
        self.pred = mlp([128, 512, 128])
        self.target = copy.deepcopy(nn.ModuleDict({"enc": enc, "proj": self.proj}))
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.tau0 = tau

    def loss(self, x1, x2):
        x = torch.cat([x1, x2])
        p = F.normalize(self.pred(self.proj(self.enc(x))), dim=1)
        with torch.no_grad():
            z = F.normalize(self.target["proj"](self.target["enc"](x)), dim=1)
        n = x1.shape[0]
        z = torch.cat([z[n:], z[:n]])  # each view predicts the other view's target
        return (2 - 2 * (p * z).sum(dim=1)).mean()

    @torch.no_grad()
    def after_step(self, progress):
        tau = 1 - (1 - self.tau0) * (math.cos(math.pi * progress) + 1) / 2
        online = list(self.enc.parameters()) + list(self.proj.parameters())
        for po, pt in zip(online, self.target.parameters()):
            pt.mul_(tau).add_(po.detach(), alpha=1 - tau)
        online_b = list(self.enc.buffers()) + list(self.proj.buffers())
        for bo, bt in zip(online_b, self.target.buffers()):
            bt.copy_(bo)


class VICReg(nn.Module):
    """Bardes et al. 2022: invariance 25, variance 25, covariance 1."""

    def __init__(self, enc):
        super().__init__()
        self.enc, self.proj = enc, mlp([enc.dim, 512, 512, 512])

    def loss(self, x1, x2):
        n = x1.shape[0]
        z = self.proj(self.enc(torch.cat([x1, x2])))
        z1, z2 = z[:n], z[n:]
        inv = F.mse_loss(z1, z2)
        var = cov = 0
        for zi in (z1, z2):
            zc = zi - zi.mean(0)
            std = torch.sqrt(zc.var(0) + 1e-4)
            var = var + F.relu(1 - std).mean() / 2
            c = (zc.t() @ zc) / (n - 1)
            off = c - torch.diag(torch.diag(c))
            cov = cov + off.pow(2).sum() / zi.shape[1]
        return 25 * inv + 25 * var + cov

    def after_step(self, progress):
        pass


class BarlowTwins(nn.Module):
    """Zbontar et al. 2021: cross-correlation to identity, off-diagonal weight 5e-3."""

    def __init__(self, enc, lambd=5e-3):
        super().__init__()
        self.enc, self.proj, self.lambd = enc, mlp([enc.dim, 512, 512, 512], last_bn=True), lambd

    def loss(self, x1, x2):
        n = x1.shape[0]
        z = self.proj[:-1](self.enc(torch.cat([x1, x2])))
        bn = self.proj[-1]
        z1, z2 = bn(z[:n]), bn(z[n:])  # each view standardised on its own batch
        c = z1.t() @ z2 / n
        on = (torch.diagonal(c) - 1).pow(2).sum()
        off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
        return on + self.lambd * off

    def after_step(self, progress):
        pass


class SimSiam(nn.Module):
    """Chen & He 2021: a predictor regresses the other view's projection under stop-gradient."""

    def __init__(self, enc):
        super().__init__()
        # Projector: three layers, BN on every one including the output (affine-free there, as
        # in the paper's code); predictor: a bottleneck MLP at ratio 4 (512 -> 128 -> 512).
        self.enc, self.proj = enc, mlp([enc.dim, 512, 512, 512], last_bn=True)
        self.pred = mlp([512, 128, 512])

    def loss(self, x1, x2):
        n = x1.shape[0]
        z = self.proj(self.enc(torch.cat([x1, x2])))
        p = self.pred(z)
        z = torch.cat([z[n:], z[:n]]).detach()  # each view predicts the other view's projection
        return -F.cosine_similarity(p, z, dim=1).mean()

    def after_step(self, progress):
        pass


def momentum_update(online, target, tau):
    """target <- tau * target + (1 - tau) * online for parameters; buffers (BN statistics) copied."""
    for po, pt in zip(online.parameters(), target.parameters()):
        pt.mul_(tau).add_(po.detach(), alpha=1 - tau)
    for bo, bt in zip(online.buffers(), target.buffers()):
        bt.copy_(bo)


def frozen_copy(module):
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class MoCo(nn.Module):
    """He et al. 2020 / Chen et al. 2020 (MoCo v2): InfoNCE of a query against its key and a
    queue of keys from past batches, the keys from a momentum encoder; MLP head, temperature 0.2;
    shuffling BN emulated by sub-batches."""

    def __init__(self, enc, queue_size=4096, momentum=0.99, temperature=0.2, sub_batches=4):
        super().__init__()
        self.enc = enc
        # MoCo v2's head: fc-ReLU-fc, no BN (hidden 2048 on ImageNet, 512 here), 128-d output.
        self.proj = nn.Sequential(nn.Linear(enc.dim, 512), nn.ReLU(), nn.Linear(512, 128))
        self.key = frozen_copy(nn.Sequential(enc, self.proj))
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, 128), dim=1))
        self.ptr, self.m, self.t, self.sub = 0, momentum, temperature, sub_batches

    def loss(self, x1, x2):
        n = x1.shape[0]
        chunks = lambda x: torch.arange(n, device=x.device).chunk(self.sub)
        # Queries: BN statistics per sub-batch, in order (MoCo's per-GPU BN).
        q = F.normalize(torch.cat([self.proj(self.enc(x1[c])) for c in chunks(x1)]), dim=1)
        with torch.no_grad():
            # Keys: the same sub-batch split after a shuffle, so a query and its own key never
            # share BN statistics (shuffling BN); the shuffle is undone after the forward pass.
            perm = torch.randperm(n, device=x2.device)
            k = torch.cat([self.key(x2[perm[c]]) for c in chunks(x2)])
            k = F.normalize(k[torch.argsort(perm)], dim=1)
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ self.queue.t()
        logits = torch.cat([pos, neg], dim=1) / self.t
        self._keys = k
        return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=q.device))

    @torch.no_grad()
    def after_step(self, progress):
        # The momentum update, then the batch's keys replace the oldest ones in the queue.
        momentum_update(nn.Sequential(self.enc, self.proj), self.key, self.m)
        k, size = self._keys, self.queue.shape[0]
        idx = (self.ptr + torch.arange(k.shape[0], device=k.device)) % size
        self.queue[idx] = k
        self.ptr = (self.ptr + k.shape[0]) % size


@torch.no_grad()
def sinkhorn(scores, eps=0.05, iters=3):
    """SwAV's Sinkhorn-Knopp: soft assignments of a batch (B x K scores) to K prototypes, with
    every prototype given an equal share of the batch; rows sum to 1."""
    q = torch.exp(scores / eps).t()  # K x B
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


class SwAV(nn.Module):
    """Caron et al. 2020: each view's code (Sinkhorn-Knopp over the batch) is predicted from the
    other view's prototype scores; temperature 0.1, eps 0.05, 3 iterations, 100 prototypes."""

    def __init__(self, enc, prototypes=100, temperature=0.1, eps=0.05, iters=3, freeze_until=0.1):
        super().__init__()
        self.enc, self.proj = enc, mlp([enc.dim, 512, 128])
        self.prototypes = nn.Parameter(F.normalize(torch.randn(prototypes, 128), dim=1))
        self.t, self.eps, self.iters, self.freeze_until = temperature, eps, iters, freeze_until
        self.progress = 0.0

    def loss(self, x1, x2):
        n = x1.shape[0]
        z = F.normalize(self.proj(self.enc(torch.cat([x1, x2]))), dim=1)
        # SwAV keeps the prototypes fixed at first (its first epoch); detached, they get no update.
        c = self.prototypes if self.progress >= self.freeze_until else self.prototypes.detach()
        scores = z @ c.t()
        s1, s2 = scores[:n], scores[n:]
        q1, q2 = sinkhorn(s1.detach(), self.eps, self.iters), sinkhorn(s2.detach(), self.eps, self.iters)
        p1, p2 = F.log_softmax(s1 / self.t, dim=1), F.log_softmax(s2 / self.t, dim=1)
        return -0.5 * ((q1 * p2).sum(dim=1).mean() + (q2 * p1).sum(dim=1).mean())

    @torch.no_grad()
    def after_step(self, progress):
        self.progress = progress
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1))  # prototypes stay on the unit sphere


class DINOHead(nn.Module):
    """DINO's head: a 3-layer MLP to a bottleneck, L2-normalised, then a weight-normalised linear
    layer with its norm fixed to 1 (DINO's norm_last_layer) to `out_dim` outputs."""

    def __init__(self, din, out_dim, hidden=512, bottleneck=128):
        super().__init__()
        self.mlp = mlp([din, hidden, hidden, bottleneck])
        self.last = nn.Parameter(torch.randn(out_dim, bottleneck) * bottleneck ** -0.5)

    def forward(self, h):
        return F.normalize(self.mlp(h), dim=1) @ F.normalize(self.last, dim=1).t()


class DINO(nn.Module):
    """Caron et al. 2021: the student's distribution over 4096 outputs matches the teacher's,
    which is centred (momentum 0.9) and sharpened (temperature 0.04 vs the student's 0.1); the
    teacher is an EMA of the student, tau 0.99 -> 1 (cosine). Two global views, no multi-crop."""

    def __init__(self, enc, out_dim=4096, tau=0.99, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9):
        super().__init__()
        self.enc, self.head = enc, DINOHead(enc.dim, out_dim)
        self.teacher = frozen_copy(nn.Sequential(enc, self.head))
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.tau0, self.ts, self.tt, self.cm = tau, student_temp, teacher_temp, center_momentum

    def loss(self, x1, x2):
        n = x1.shape[0]
        x = torch.cat([x1, x2])
        s = F.log_softmax(self.head(self.enc(x)) / self.ts, dim=1)
        with torch.no_grad():
            t_out = self.teacher(x)
            t = F.softmax((t_out - self.center) / self.tt, dim=1)
            t = torch.cat([t[n:], t[:n]])  # each student view matches the teacher on the other view
            self._batch_center = t_out.mean(dim=0, keepdim=True)
        return -(t * s).sum(dim=1).mean()

    @torch.no_grad()
    def after_step(self, progress):
        self.center.mul_(self.cm).add_(self._batch_center, alpha=1 - self.cm)
        tau = 1 - (1 - self.tau0) * (math.cos(math.pi * progress) + 1) / 2
        momentum_update(nn.Sequential(self.enc, self.head), self.teacher, tau)


def build(method, enc):
    return {"simclr": SimCLR, "byol": BYOL, "vicreg": VICReg, "barlow_twins": BarlowTwins, "simsiam": SimSiam,
            "moco": MoCo, "swav": SwAV, "dino": DINO}[method](enc)


# ---------------------------------------------------------------- augmentation

def augment(x, gen):
    """Batched SSL views of (B, 1, 28, 28) images in [0, 1]: random resized crop (scale
    0.2-1, ratio 3/4-4/3), horizontal flip, brightness/contrast jitter (p = 0.8), then
    normalisation."""
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)
    area = 0.2 + 0.8 * u(b)
    logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u(b)
    ratio = torch.exp(logr)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (2 * u(b) - 1) * (1 - w)
    cy = (2 * u(b) - 1) * (1 - h)
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    jitter = (u(b) < 0.8).float().view(b, 1, 1, 1)
    contrast = 1 + jitter * (0.8 * u(b).view(b, 1, 1, 1) - 0.4)
    bright = 1 + jitter * (0.8 * u(b).view(b, 1, 1, 1) - 0.4)
    m = v.mean(dim=(1, 2, 3), keepdim=True)
    v = ((v - m) * contrast + m) * bright
    return (v.clamp(0, 1) - MEAN) / STD


def normalise(x_uint8):
    return (torch.from_numpy(x_uint8).float().unsqueeze(1) / 255.0 - MEAN) / STD


@torch.no_grad()
def embed(enc, x_uint8, batch=1000):
    enc.eval()
    dev = next(enc.parameters()).device
    return torch.cat([enc(normalise(x_uint8[i:i + batch]).to(dev)).cpu() for i in range(0, len(x_uint8), batch)]).numpy()


def validation_split(n, fraction, seed):
    """(train rows, validation rows) of a seeded random permutation of range(n): the last
    round(fraction * n) rows of the permutation are the validation rows. No t10k image is used."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(fraction * n))
    return np.sort(perm[: n - n_val]), np.sort(perm[n - n_val:])


EPSILONS = [4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0]
MIN_COVERAGE = 0.99


def choose_epsilon(feats):
    """The largest eps (from 4 down) for which at least 99% of the training images have a
    non-empty highly-activating set L = {j : h_j > mu + eps * sigma}. Label-free.

    The paper's eps = 4 suits 2048-d ResNet-50 features; on a 128-d representation almost no
    feature clears mu + 4 sigma, L is empty for most images, and every such image scores Q = 0,
    which carries no information. Returns (eps, coverage at that eps, coverage per eps tried)."""
    mu = feats.mean(axis=1, keepdims=True)
    sigma = feats.std(axis=1, ddof=1, keepdims=True)
    coverage = {eps: float(((feats > mu + eps * sigma) & (sigma > 0)).any(axis=1).mean()) for eps in EPSILONS}
    eps = next((e for e in EPSILONS if coverage[e] >= MIN_COVERAGE), EPSILONS[-1])
    return eps, coverage[eps], coverage


def linear_probe(train_f, train_y, test_f, test_y, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_f)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    clf.fit(scaler.transform(train_f), train_y)
    return float((clf.predict(scaler.transform(test_f)) == test_y).mean())


# ---------------------------------------------------------------- export

def export(enc, out, test_x, seed):
    enc.eval()
    onnx_path = out / "model.onnx"
    torch.onnx.export(enc, torch.zeros(1, 1, 28, 28), str(onnx_path), input_names=["pixel_values"],
                      output_names=["embedding"], dynamic_axes={"pixel_values": {0: "batch"}, "embedding": {0: "batch"}},
                      opset_version=17, do_constant_folding=True)
    import onnxruntime as ort

    x = normalise(test_x[:256])
    with torch.no_grad():
        want = enc(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {"pixel_values": x.numpy()})[0]
    diff = float(np.abs(got - want).max())
    assert diff <= 1e-4, f"ONNX Runtime differs from PyTorch by {diff}"
    return diff


def fixture_golden(enc, fixtures):
    """PyTorch embeddings of the first fixture of each class, read from the committed PNGs."""
    from PIL import Image

    out = {}
    for cls in CLASSES:
        path = sorted((fixtures / cls).glob("*.png"))[0]
        img = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)[None]
        with torch.no_grad():
            out[f"{cls}/{path.name}"] = [round(v, 6) for v in enc.eval()(normalise(img))[0].tolist()]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=16, help="base width w; the representation has 8w features")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke tests)")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="share of the training images held out to choose the epoch count (with --choose-epochs)")
    ap.add_argument("--choose-epochs", default="",
                    help="comma-separated candidate epoch counts: train to the largest, keep the one whose probe "
                         "does best on the validation split (overrides --epochs)")
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--checkpoint", type=pathlib.Path,
                    help="also save the shipped epoch's whole method (encoder, heads, target network, queue) "
                         "as a PyTorch state dict, for models/recipes/finetune_qscore.py; not bundled (heads are "
                         "dropped at export)")
    ap.add_argument("--fixtures", type=pathlib.Path, default=pathlib.Path("tests/fixtures/fmnist"))
    args = ap.parse_args()
    candidates = sorted({int(e) for e in args.choose_epochs.split(",") if e.strip()})
    if candidates:
        if not 0 < args.val_fraction < 1:
            ap.error("--choose-epochs needs --val-fraction in (0, 1)")
        args.epochs = candidates[-1]
    out = args.out or pathlib.Path("models") / f"fmnist-{args.method}"
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    dev = torch.device(args.device)

    train_x, train_y = load_fmnist("train")
    test_x, test_y = load_fmnist("t10k")
    pool = train_x[: args.limit] if args.limit else train_x
    data = torch.from_numpy(pool).float().unsqueeze(1) / 255.0

    enc = ResNet18Small(args.width)
    model = build(args.method, enc).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-6)
    steps_per_epoch = len(data) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = min(200, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))

    log = {"epochs": []}
    if candidates:
        fit_rows, val_rows = validation_split(len(pool), args.val_fraction, args.seed)
        choice = {"val_fraction": args.val_fraction, "val_images": int(len(val_rows)), "probe_fit_images": int(len(fit_rows)),
                  "candidates": candidates, "curve": [], "chosen": None}
        best_state, best_acc = None, -1.0
    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(data), generator=gen)
        losses = []
        te = time.time()
        for i in range(steps_per_epoch):
            xb = data[perm[i * args.batch_size:(i + 1) * args.batch_size]]
            x1, x2 = augment(xb, gen).to(dev), augment(xb, gen).to(dev)
            loss = model.loss(x1, x2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            model.after_step(step / total)
            losses.append(loss.item())
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - te, 1)}
        if candidates and epoch + 1 in candidates:
            feats = embed(enc, pool)
            val_acc = linear_probe(feats[fit_rows], train_y[: len(pool)][fit_rows], feats[val_rows],
                                   train_y[: len(pool)][val_rows], args.seed)
            choice["curve"].append({"epoch": epoch + 1, "val_accuracy": val_acc})
            entry["val_accuracy"] = val_acc
            if val_acc > best_acc:  # strictly: the earliest of equal epochs
                # The whole method (heads, target network, queue), not only the encoder, so
                # that --checkpoint keeps what fine-tuning with the method's own loss needs.
                best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
                choice["chosen"] = epoch + 1
        log["epochs"].append(entry)
        print(json.dumps(entry), flush=True)
    train_seconds = time.time() - t0
    if candidates:
        model.load_state_dict(best_state)
        log["epoch_choice"] = choice
        print(json.dumps({"epoch_choice": choice}), flush=True)
    epochs_shipped = choice["chosen"] if candidates else args.epochs

    if args.checkpoint:
        torch.save({"method": args.method, "width": args.width, "seed": args.seed, "epochs": epochs_shipped,
                    "state_dict": model.cpu().state_dict()}, args.checkpoint)
    enc = enc.cpu().eval()
    tp = time.time()
    train_f = embed(enc, train_x)
    acc = linear_probe(train_f, train_y, embed(enc, test_x), test_y, args.seed)
    epsilon, eps_coverage, coverage = choose_epsilon(train_f)
    probe_seconds = time.time() - tp
    diff = export(enc, out, test_x, args.seed)
    size = (out / "model.onnx").stat().st_size
    golden = fixture_golden(enc, args.fixtures) if args.fixtures.is_dir() else {}

    hardware = f"{platform.processor() or platform.machine()}, {args.threads} CPU thread{'s' if args.threads != 1 else ''}" if args.device == "cpu" else args.device
    command = "make train-env && .venv-train/bin/python models/recipes/train_ssl.py " + " ".join(sys.argv[1:])
    log.update({
        "method": args.method, "seed": args.seed, "epochs_run": args.epochs, "epochs_shipped": epochs_shipped,
        "batch_size": args.batch_size, "lr": args.lr,
        "width": args.width, "embedding_dim": enc.dim, "train_images": len(data), "train_seconds": round(train_seconds, 1),
        "probe_seconds": round(probe_seconds, 1), "probe_accuracy_t10k": acc, "onnx_max_abs_diff": diff,
        "onnx_bytes": size, "epsilon": epsilon, "epsilon_coverage": eps_coverage,
        "coverage_by_epsilon": {str(k): v for k, v in coverage.items()}, "hardware": hardware, "torch": torch.__version__, "command": command,
    })
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    (out / "golden.json").write_text(json.dumps({"images": golden}) + "\n")
    write_manifest(out, args, enc.dim, epsilon, epochs_shipped)
    write_readme(out, log)
    print(json.dumps({k: v for k, v in log.items() if k != "epochs"}), flush=True)


NAMES = {"simclr": "SimCLR", "byol": "BYOL", "vicreg": "VICReg", "barlow_twins": "Barlow Twins",
         "simsiam": "SimSiam", "moco": "MoCo v2", "swav": "SwAV", "dino": "DINO"}
# What each method trains beside the encoder, all dropped at export.
HEADS = {"simclr": "The projector was", "byol": "The projector, the predictor and the target network were",
         "vicreg": "The projector was", "barlow_twins": "The projector was",
         "simsiam": "The projector and the predictor were",
         "moco": "The projection head, the momentum (key) encoder and the queue of keys were",
         "swav": "The projector and the prototypes were",
         "dino": "The projection head and the teacher network (with its centre) were"}
# The linear probe of the same network untrained (its seed-0 initialisation, base width 16; every
# method builds the encoder first, so they all start from it): `--epochs 0` measures it.
UNTRAINED = {"seed": 0, "width": 16, "probe_accuracy_t10k": 0.7954}


def write_manifest(out, args, dim, epsilon, epochs_shipped):
    name = out.name
    choose = f" --val-fraction {args.val_fraction} --choose-epochs {args.choose_epochs}" if args.choose_epochs else ""
    (out / "model.toml").write_text(f'''name = "{name}"
version = "1.0.0"
description = "{NAMES[args.method]} ResNet-18 (width {args.width}, 28x28 greyscale) trained self-supervised on Fashion-MNIST train, {epochs_shipped} epochs: a {dim}-d non-negative representation"

[provenance]
source = "{NAMES[args.method]}, ResNet-18 adapted to 28x28 (3x3 stem, no max-pool), heads dropped; seed {args.seed}"
weights = "trained by this project from Debian dataset-fashion-mnist (train split, 60,000 images, no labels)"
recipe = "models/recipes/train_ssl.py --method {args.method} --epochs {args.epochs}{choose} --seed {args.seed} --threads {args.threads}"
license = "Apache-2.0 (this project); Fashion-MNIST is MIT-licensed"

[input]
name = "pixel_values"
channels = 1
height = 28
width = 28

[output]
name = "embedding"
dim = {dim}

[preprocess]
color = "grey"
mean = [{MEAN}]
std = [{STD}]

[qscore]
# Largest eps with a non-empty L for >= 99% of the training images (train_ssl.choose_epsilon).
epsilon = {epsilon}
percentiles = [50.0, 95.0]
''')


def write_readme(out, log):
    m = log["method"]
    rows = "\n".join(f"| {e['epoch']} | {e['loss']:.4f} | {e['seconds']} |" for e in log["epochs"])
    choice = log.get("epoch_choice")
    if choice:
        curve = ", ".join(f"{c['epoch']}: {100 * c['val_accuracy']:.2f}%" for c in choice["curve"])
        epochs_row = (f"{log['epochs_shipped']}, chosen on a validation split of the training images "
                      f"({100 * choice['val_fraction']:g}%, {choice['val_images']} images; probe accuracy by epoch: {curve}) "
                      f"from a {log['epochs_run']}-epoch run (batch {log['batch_size']}, AdamW lr {log['lr']}, cosine schedule)")
    else:
        epochs_row = f"{log['epochs_run']} (batch {log['batch_size']}, AdamW lr {log['lr']}, cosine schedule)"
    untrained = ""
    if (log["seed"], log["width"]) == (UNTRAINED["seed"], UNTRAINED["width"]):
        delta = 100 * (log["probe_accuracy_t10k"] - UNTRAINED["probe_accuracy_t10k"])
        untrained = (f"| the same network untrained (seed {log['seed']}, `--epochs 0`), same probe | "
                     f"{100 * UNTRAINED['probe_accuracy_t10k']:.2f}% (trained: {delta:+.2f} points) |\n")
    (out / "README.md").write_text(f"""# {out.name}

A {NAMES[m]} encoder trained by this project, self-supervised, on the 60,000 Fashion-MNIST
training images (Debian `dataset-fashion-mnist`; no labels used in training). Backbone: ResNet-18
adapted to 28 x 28 greyscale (3x3 stem, stride 1, no max-pool), base width {log['width']}; the
representation is the global average pool of the last stage after its ReLU: {log['embedding_dim']}
non-negative features. {HEADS[m]} dropped at export.

## Result

| | |
|---|---|
| linear-probe accuracy, t10k (frozen encoder, standardised features, multinomial logistic regression on the 60k train split) | **{100 * log['probe_accuracy_t10k']:.2f}%** |
{untrained}| epochs | {epochs_row} |
| training time | {log['train_seconds'] / 60:.1f} min on {log['hardware']} |
| embedding size | {log['embedding_dim']} |
| model.onnx | {log['onnx_bytes'] / 1e6:.1f} MB, opset 17, dynamic batch |
| ONNX Runtime vs PyTorch, 256 t10k images | max abs difference {log['onnx_max_abs_diff']:.2e} |
| Q-Score epsilon (label-free: largest eps giving a non-empty L on >= 99% of train images) | {log['epsilon']} (coverage {100 * log['epsilon_coverage']:.1f}%; at eps = 4: {100 * log['coverage_by_epsilon']['4.0']:.1f}%) |

| epoch | loss | seconds |
|---|---|---|
{rows}

## Rebuild

```sh
{log['command']}
```

PyTorch {log['torch']} (Debian `python3-torch`), seed {log['seed']}. The same seed, epochs and
thread count give the same data order, augmentations and schedule, and not always
bit-identical weights (a SimCLR rerun gave the same model.onnx; a BYOL rerun's probe moved 0.7
points, see `fmnist-byol`); `train_log.json` has the full record. Preprocessing served by qscore: greyscale, 28 x 28, scale to [0, 1], mean {MEAN}, std {STD}.
""")


if __name__ == "__main__":
    main()
