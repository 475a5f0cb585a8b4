"""The Q-Score regularisation table of models/README.md, from what `make qreg-models` left behind.

For every `<dir>/<source>-finetune_log.json` (models/recipes/finetune_qscore.py) it reads the
probe accuracies that run measured (t10k, train_ssl.py's probe: before, after the control, after
the regulariser) and, from qscore's own calibration.json of the three encoders (all under
`<dir>`; the starting one is `<dir>/<source>`), the figures qscore computed on the 5,000 test
images of its held-out split: the Q-Score's AUPRC for the probe's mistakes (against their base
rate) and the compression figures (probe accuracy on D, the discriminative features, against as
many random features; and on the features with A_j > 0, the paper's operating point). Nothing is
recomputed here: every number is copied from those files, so the maths is qscore's.

Usage:
  python3 models/recipes/qreg_table.py --qreg-dir /tmp/qscore-qreg/models [--write models/README.md]

--write replaces the text between `<!-- qreg -->` and `<!-- /qreg -->` in that file; without it
the table goes to standard output.
"""
import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from readme_sections import replace_section  # noqa: E402


def pct(x):
    return f"{100 * x:.2f}"


def evaluation(model_dir):
    path = model_dir / "calibration.json"
    if not path.exists():
        sys.exit(f"{path} is missing: calibrate the model first (make qreg-models does)")
    return json.loads(path.read_text())["evaluation"]


def q_auprc(ev):
    q = next(e for e in ev["estimators"] if e["source"] == "q_score")
    return f"{pct(q['auprc'])} / {pct(ev['error_rate'])}"


def compression(ev):
    c = ev["compression"]
    return (f"{c['discriminative']}: {pct(c['accuracy_discriminative'])} vs {pct(c['accuracy_random_mean'])}; "
            f"{c['active']['kept']}: {pct(c['active']['accuracy'])}")


def rows(qreg_dir):
    for log_path in sorted(qreg_dir.glob("*-finetune_log.json")):
        log = json.loads(log_path.read_text())
        source = log["source"]
        acc = log["probe_accuracy_t10k"]
        evs = {"before": evaluation(qreg_dir / source),
               "control": evaluation(qreg_dir / f"{source}-control"),
               "qreg": evaluation(qreg_dir / f"{source}-qreg")}
        schedule = f"{log['epochs']} x {log['train_images']:,} images, lr {log['lr']:g}"
        yield (f"| {log['name']} | {schedule} | {pct(acc['before'])} | {pct(acc['control'])} | "
               f"{pct(acc['qreg'])} | {100 * (acc['qreg'] - acc['control']):+.2f} | "
               + " | ".join(q_auprc(evs[v]) for v in ("before", "control", "qreg")) + " | "
               + " | ".join(compression(evs[v]) for v in ("before", "control", "qreg")) + " |")


HEADER = """\
| method | fine-tuning | probe before | probe control | probe Q-reg | Q-reg - control | Q AUPRC / base rate, before | control | Q-reg | compression before: \\|D\\|: probe on D vs random; \\|A_j > 0\\|: probe | control | Q-reg |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qreg-dir", type=pathlib.Path, required=True)
    ap.add_argument("--write", type=pathlib.Path)
    args = ap.parse_args()
    body = list(rows(args.qreg_dir))
    if not body:
        sys.exit(f"no *-finetune_log.json under {args.qreg_dir}: run make qreg-models first")
    table = HEADER + "\n" + "\n".join(body)
    if args.write:
        replace_section(args.write, "qreg", table)
    else:
        print(table)


if __name__ == "__main__":
    main()
