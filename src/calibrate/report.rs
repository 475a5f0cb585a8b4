//! The evaluation report: calibration files in, Markdown tables out (`qscore evaluate`, and
//! the summary `qscore calibrate` prints).

use std::fmt::Write as _;

use crate::{
    model::calibration::{BestLabelFree, Calibration},
    risk::RiskSource,
};

fn pct(v: f64) -> String {
    format!("{:.2}", 100.0 * v)
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), pct)
}

/// Markdown tables over one or more calibrated models. Every figure is on each model's test
/// part (never seen by any choice); percentages throughout.
pub fn markdown(cals: &[&Calibration]) -> String {
    let mut out = String::new();
    // Every estimator any of the files measured (older files lack the newer ones; a file
    // without confidences lacks user_confidence): those a file lacks read "-".
    let sources: Vec<RiskSource> = RiskSource::ALL
        .into_iter()
        .filter(|&s| cals.iter().any(|c| c.evaluation.estimators.iter().any(|m| m.source == s)))
        .collect();
    let names: Vec<&str> = sources.iter().map(|r| r.name()).collect();

    let _ = writeln!(out, "#### Predicting the probe's mistakes: AUPRC (AUROC) on the test part\n");
    let _ = writeln!(
        out,
        "| model | test images | probe acc. | error rate (AUPRC of chance) | {} | chosen |",
        names.join(" | ")
    );
    let _ = writeln!(out, "|---|---:|---:|---:|{}---|", "---:|".repeat(names.len()));
    for c in cals {
        let e = &c.evaluation;
        let cells: Vec<String> = sources
            .iter()
            .map(|&s| match e.estimators.iter().find(|m| m.source == s) {
                None => "-".into(),
                Some(m) => {
                    let cell = format!("{} ({})", opt(m.auprc), opt(m.auroc));
                    if m.source == c.risk_source { format!("**{cell}**") } else { cell }
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            c.model,
            e.test_images,
            pct(e.probe_accuracy),
            pct(e.error_rate),
            cells.join(" | "),
            c.risk_source
        );
    }

    let _ = writeln!(
        out,
        "\n#### Best label-free estimator: AUPRC vs base rate (chosen by select AUPRC among {})\n",
        RiskSource::ALL.into_iter().filter(|s| s.label_free()).map(RiskSource::name).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        out,
        "| model | best label-free estimator | select AUPRC | test AUPRC | test AUROC | base rate | AUPRC / base rate |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    for c in cals {
        let e = &c.evaluation;
        match e.best_label_free.or_else(|| BestLabelFree::of(&e.estimators, e.error_rate)) {
            None => {
                let _ = writeln!(out, "| {} | - | - | - | - | {} | - |", c.model, pct(e.error_rate));
            }
            Some(b) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    c.model,
                    b.source,
                    opt(b.select_auprc),
                    opt(b.auprc),
                    opt(b.auroc),
                    pct(b.base_rate),
                    b.auprc_over_base_rate.map_or("-".into(), |r| format!("{r:.2}x"))
                );
            }
        }
    }

    let _ = writeln!(out, "\n#### The paper's framing: Q-Score for \"correctly classified\", AUPRC (AUROC)\n");
    let _ = writeln!(out, "| model | Q-Score | share correct (AUPRC of chance) |");
    let _ = writeln!(out, "|---|---:|---:|");
    for c in cals {
        let r = &c.evaluation.q_score_for_correct;
        let _ = writeln!(out, "| {} | {} ({}) | {} |", c.model, opt(r.auprc), opt(r.auroc), pct(r.base_rate));
    }

    let _ = writeln!(out, "\n#### The shipped flag (tau chosen on the select part, measured on the test part)\n");
    let _ = writeln!(
        out,
        "| model | risk source | tau | p_misclassified AUPRC / base rate | flagged | precision | recall | error rate flagged | error rate not flagged | lift |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cals {
        let e = &c.evaluation;
        let f = &e.flag;
        let ratio = e
            .p_misclassified
            .auprc
            .map_or("-".into(), |a| format!("{} / {} = {:.2}x", pct(a), pct(e.error_rate), a / e.error_rate));
        let _ = writeln!(
            out,
            "| {} | {} | {:.3} | {} | {} | {} | {} | {} | {} | {} |",
            c.model,
            c.risk_source,
            c.threshold,
            ratio,
            pct(f.operating.flagged_rate),
            pct(f.operating.precision),
            pct(f.operating.recall),
            pct(f.error_rate_flagged),
            pct(f.error_rate_unflagged),
            f.lift.map_or("-".into(), |l| format!("{l:.2}x"))
        );
    }

    let _ = writeln!(out, "\n#### Compression: probe accuracy on D's features alone\n");
    let _ = writeln!(
        out,
        "| model | eps | band | \\|D\\| / d | kept | on D | random subsets of \\|D\\| (mean ± sd, n) | all d |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cals {
        let k = &c.evaluation.compression;
        let _ = writeln!(
            out,
            "| {} | {} | {}-{} | {} / {} | {} | {} | {} ± {} ({}) | {} |",
            c.model,
            c.epsilon,
            c.percentiles.0,
            c.percentiles.1,
            k.discriminative,
            k.dim,
            pct(k.kept_ratio),
            pct(k.accuracy_discriminative),
            pct(k.accuracy_random_mean),
            pct(k.accuracy_random_sd),
            k.accuracy_random.len(),
            pct(k.accuracy_all)
        );
    }

    if cals.iter().any(|c| !c.evaluation.sweep.is_empty()) {
        let _ = writeln!(out, "\n#### Q-Score under other eps and bands (D refitted on the fit part each time)\n");
        let _ =
            writeln!(out, "| model | eps | band | \\|D\\| | images with Q = 0 | AUPRC (mistakes) | AUROC (mistakes) |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for c in cals {
            for r in &c.evaluation.sweep {
                let _ = writeln!(
                    out,
                    "| {} | {} | {}-{} | {} | {} | {} | {} |",
                    c.model,
                    r.epsilon,
                    r.percentiles.0,
                    r.percentiles.1,
                    r.discriminative,
                    pct(r.zero_share),
                    opt(r.misclassified.auprc),
                    opt(r.misclassified.auroc)
                );
            }
        }
    }
    out
}
