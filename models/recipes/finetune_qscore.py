"""Q-Score-regularised fine-tuning of a trained SSL encoder, always beside its control.

The paper (Kalibhat et al., AAAI 2024, v4-v6) fine-tunes pre-trained encoders with the method's
own SSL loss plus two regularisers of weight 1e-4 each, then re-runs the linear probe. Its code is
unpublished; design.md section 5 records what secondary sources say. Every choice they leave open
is made here, and named:

- **Starting point.** The whole method as `train_ssl.py --checkpoint` saved it at the shipped
  epoch (encoder, heads, target network, queue): the SSL loss needs its heads, which the bundled
  ONNX files no longer have.
- **Which layers train.** All of them, batch-norm statistics included, as in pre-training.
- **Differentiable Q.** Q = (1/|L cap D|) sum_{j in L cap D} (h_j - mu) (design.md section 1)
  with membership of L relaxed: s_j = sigmoid((h_j - mu - eps sigma) / (0.5 sigma)) for j in D
  (0 outside D) and Q = sum_j s_j (h_j - mu) / max(1, sum_j s_j). With hard masks a sample whose
  L cap D is empty has Q = 0 and no gradient at all, yet those are the lowest-Q samples the term
  exists for (a smoke run with hard masks read term 1 at exactly 0). D is fixed for the whole run,
  computed once, label-free, from the starting encoder on the training images (eps chosen as
  train_ssl.choose_epsilon does, percentiles 50/95).
- **Term 1 (raise low Q).** -(1/B) sum over the samples of the batch whose Q is below the batch
  mean of Q_i. Minimising it raises those samples' Q.
- **Term 2 (over-activated features).** With n_j = sum_i |h_ij| over the batch (the L1 norm of
  feature j), (1/B) sum over the features whose n_j exceeds the mean of n of n_j.
- **Where h comes from.** The representation of the first view (the method's loss sees both
  views as in pre-training; the regulariser costs one more forward pass of the encoder).
- **Schedule.** --epochs (default 1) at a constant --lr (default 1e-4, a twentieth of the
  pre-training peak) with AdamW; the paper's 50 epochs at 1e-5 do not fit this project's CPU
  budget. The **control** runs the same schedule, data order and augmentations (the same seeded
  generator) with both weights at 0, so a gain over the start that the control also shows is
  just more training.

Outputs under --out: fmnist-<method>-control/ and fmnist-<method>-qreg/ (model.onnx, model.toml,
finetune_log.json), and finetune_log.json with the probe accuracies (t10k, the same probe as
train_ssl.py) before, after the control and after the regulariser. Q's AUPRC for mistakes, the
compression curve and the heatmaps' core share come from qscore's own tools on the exported
models (`make qreg-models`), so their maths is the server's, not a second copy here.

Usage:
  .venv-train/bin/python -s models/recipes/train_ssl.py --method simclr --epochs 3 --checkpoint /tmp/simclr.pt
  .venv-train/bin/python -s models/recipes/finetune_qscore.py --checkpoint /tmp/simclr.pt --source models/fmnist-simclr --out /tmp/qreg
"""
import argparse
import copy
import json
import pathlib
import re
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_ssl import (NAMES, ResNet18Small, augment, build, choose_epsilon, embed, export,  # noqa: E402
                       linear_probe, load_fmnist)


def discriminative_mask(feats, eps, lo=50.0, hi=95.0):
    """D of design.md section 1 over a reference set: features whose activation frequency A_j is
    non-zero and between the lo-th and hi-th percentiles (linear interpolation) of the non-zero
    A_j. feats: (N, d) non-negative representations. Returns a (d,) bool array."""
    mu = feats.mean(axis=1, keepdims=True)
    sigma = feats.std(axis=1, ddof=1, keepdims=True)
    a = 100.0 * ((feats > mu + eps * sigma) & (sigma > 0)).mean(axis=0)
    nz = a[a > 0]
    if nz.size == 0:
        return np.zeros(feats.shape[1], dtype=bool)
    p_lo, p_hi = np.percentile(nz, [lo, hi])
    return (a > 0) & (a >= p_lo) & (a <= p_hi)


# The width of the relaxed threshold of L, in units of sigma.
SOFTNESS = 0.5


def q_regulariser(h, d_mask, eps):
    """(term 1, term 2) of the module docstring for a batch h of shape (B, d)."""
    mu = h.mean(dim=1, keepdim=True)
    sigma = h.std(dim=1, keepdim=True).clamp(min=1e-6)
    m = torch.sigmoid((h - mu - eps * sigma) / (SOFTNESS * sigma)) * d_mask
    q = (m * (h - mu)).sum(dim=1) / m.sum(dim=1).clamp(min=1)
    low = (q < q.mean()).float().detach()
    raise_low_q = -(low * q).sum() / h.shape[0]
    n = h.abs().sum(dim=0)
    over = (n > n.mean()).float().detach()
    over_activated = (over * n).sum() / h.shape[0]
    return raise_low_q, over_activated


def finetune(model, data, args, d_mask, eps, weights):
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=1e-6)
    steps = len(data) // args.batch_size
    log = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(data), generator=gen)
        sums = np.zeros(3)
        for i in range(steps):
            xb = data[perm[i * args.batch_size:(i + 1) * args.batch_size]]
            x1, x2 = augment(xb, gen), augment(xb, gen)
            ssl = model.loss(x1, x2)
            loss = ssl
            if any(weights):
                r1, r2 = q_regulariser(model.enc(x1), d_mask, eps)
                loss = ssl + weights[0] * r1 + weights[1] * r2
                sums[1:] += [r1.item(), r2.item()]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # The final progress: a momentum or centring schedule stays where pre-training ended.
            model.after_step(1.0)
            sums[0] += ssl.item()
        log.append({"epoch": epoch + 1, "ssl_loss": sums[0] / steps, "raise_low_q": sums[1] / steps,
                    "over_activated": sums[2] / steps})
        print(json.dumps(log[-1]), flush=True)
    return log


def write_model(out, source, variant, ckpt, args, acc):
    """model.toml for a fine-tuned encoder: the source's input, output and preprocessing."""
    toml = (source / "model.toml").read_text()
    name = f"{source.name}-{variant}"
    what = {"qreg": f"fine-tuned with the Q-Score regulariser (weights {args.w_low_q:g}, {args.w_over:g})",
            "control": "fine-tuned with the same schedule and no regulariser (the control)"}[variant]
    toml = re.sub(r'^name = ".*"$', f'name = "{name}"', toml, count=1, flags=re.M)
    toml = re.sub(r'^description = "(.*)"$',
                  lambda m: f'description = "{m.group(1)}; then {what}, {args.epochs} epoch(s) at lr {args.lr:g}"',
                  toml, count=1, flags=re.M)
    toml = re.sub(r'^recipe = ".*"$',
                  f'recipe = "models/recipes/finetune_qscore.py --source models/{source.name} --epochs {args.epochs} '
                  f'--lr {args.lr:g} --seed {args.seed} --threads {args.threads}'
                  + (f' --limit {args.limit}' if args.limit else '') + f' (probe t10k {acc:.4f})"',
                  toml, count=1, flags=re.M)
    (out / "model.toml").write_text(toml)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, required=True, help="from train_ssl.py --checkpoint")
    ap.add_argument("--source", type=pathlib.Path, required=True,
                    help="the bundled model the checkpoint was exported as (its model.toml is the template)")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--w-low-q", type=float, default=1e-4, help="weight of term 1")
    ap.add_argument("--w-over", type=float, default=1e-4, help="weight of term 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="fine-tune on the first N training images only (a shorter schedule; recorded in the "
                         "exported model.toml)")
    ap.add_argument("--probe-limit", type=int, default=0,
                    help="fit the probe on the first N train images and test it on the first N t10k images "
                         "(smoke tests; the reported figures use all of them)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    ckpt = torch.load(args.checkpoint)
    start = build(ckpt["method"], ResNet18Small(ckpt["width"]))
    start.load_state_dict(ckpt["state_dict"])
    train_x, train_y = load_fmnist("train")
    test_x, test_y = load_fmnist("t10k")
    pool = train_x[: args.limit] if args.limit else train_x
    data = torch.from_numpy(pool.copy()).float().unsqueeze(1) / 255.0

    n = args.probe_limit or None

    def probe(enc):
        return linear_probe(embed(enc, train_x[:n]), train_y[:n], embed(enc, test_x[:n]), test_y[:n], args.seed)

    feats = embed(start.enc, pool)
    eps, _, _ = choose_epsilon(feats)
    d_mask = discriminative_mask(feats, eps)
    result = {"method": ckpt["method"], "name": NAMES[ckpt["method"]], "source": args.source.name,
              "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
              "weights": [args.w_low_q, args.w_over], "epsilon": eps, "discriminative_features": int(d_mask.sum()),
              "train_images": len(data), "probe_accuracy_t10k": {"before": probe(start.enc)}}
    d_mask = torch.from_numpy(d_mask)
    for variant, weights in (("control", (0.0, 0.0)), ("qreg", (args.w_low_q, args.w_over))):
        model = copy.deepcopy(start)
        t0 = time.time()
        log = finetune(model, data, args, d_mask, eps, weights)
        enc = model.enc.cpu().eval()
        acc = probe(enc)
        out = args.out / f"{args.source.name}-{variant}"
        out.mkdir(parents=True, exist_ok=True)
        export(enc, out, test_x, args.seed)
        write_model(out, args.source, variant, ckpt, args, acc)
        entry = {"variant": variant, "weights": list(weights), "seconds": round(time.time() - t0, 1),
                 "probe_accuracy_t10k": acc, "epochs": log}
        (out / "finetune_log.json").write_text(json.dumps(entry, indent=1) + "\n")
        result["probe_accuracy_t10k"][variant] = acc
    (args.out / f"{args.source.name}-finetune_log.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
