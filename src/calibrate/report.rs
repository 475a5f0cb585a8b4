//! The evaluation report: calibration files in, Markdown tables out (`qscore evaluate`, and
//! the summary `qscore calibrate` prints).

use std::fmt::Write as _;

use crate::{
    model::calibration::{BestLabelFree, Calibration, Target},
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

    // Whose mistakes: the probe's unless every model here was calibrated for another classifier.
    let whose = match cals.first().map(|c| &c.target) {
        Some(t) if cals.iter().all(|c| c.target == *t) && *t != Target::Probe => t.to_string(),
        _ if cals.iter().all(|c| c.target == Target::Probe) => "the probe".to_owned(),
        _ => "each model's target classifier".to_owned(),
    };
    let _ = writeln!(out, "#### Predicting the mistakes of {whose}: AUPRC (AUROC) on the test part\n");
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
        "| model | risk source | isotonic prior a | tau | p_misclassified AUPRC / base rate | top p | flagged | precision | recall | error rate flagged | error rate not flagged | lift |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cals {
        let e = &c.evaluation;
        let f = &e.flag;
        let ratio = e
            .p_misclassified
            .auprc
            .map_or("-".into(), |a| format!("{} / {} = {:.2}x", pct(a), pct(e.error_rate), a / e.error_rate));
        let top = c.isotonic.y.iter().copied().fold(0.0_f32, f32::max);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.3} | {} | {:.3} | {} | {} | {} | {} | {} | {} |",
            c.model,
            c.risk_source,
            e.isotonic_prior,
            c.threshold,
            ratio,
            top,
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

    if cals.iter().any(|c| c.evaluation.compression.active.is_some()) {
        let _ = writeln!(out, "\n#### Compression at the paper's operating point: only the features with A_j > 0\n");
        let _ =
            writeln!(out, "| model | eps | kept / d | on A_j > 0 | random subsets of as many (mean ± sd, n) | all d |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for c in cals {
            let k = &c.evaluation.compression;
            if let Some(a) = &k.active {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} / {} | {} | {} | {} |",
                    c.model,
                    c.epsilon,
                    a.kept,
                    k.dim,
                    pct(a.accuracy),
                    random_cell(&a.accuracy_random, a.accuracy_random_mean, a.accuracy_random_sd),
                    pct(k.accuracy_all)
                );
            }
        }
    }

    if cals.iter().any(|c| !c.evaluation.compression.curve.is_empty()) {
        let _ = writeln!(
            out,
            "\n#### Compression curve: the k features of highest A_j (descending A_j) against k random ones\n"
        );
        let _ = writeln!(out, "| model | kept | k / d | top A_j | random (mean ± sd, n) | top minus random |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for c in cals {
            let k = &c.evaluation.compression;
            for p in &k.curve {
                let s = &p.subset;
                let _ = writeln!(
                    out,
                    "| {} | {} | {} / {} | {} | {} | {:+.2} |",
                    c.model,
                    pct(p.fraction),
                    s.kept,
                    k.dim,
                    pct(s.accuracy),
                    random_cell(&s.accuracy_random, s.accuracy_random_mean, s.accuracy_random_sd),
                    100.0 * (s.accuracy - s.accuracy_random_mean)
                );
            }
        }
    }

    if cals.iter().any(|c| !c.evaluation.sweep.is_empty()) {
        let _ = writeln!(out, "\n#### Q-Score under other eps and bands (D refitted on the fit part each time)\n");
        let _ = writeln!(
            out,
            "Each row's AUPRC for mistakes on the select part chooses a row (**bold**, the best); its \
             test figure is the honest one, the best test figure is not.\n"
        );
        let _ = writeln!(
            out,
            "| model | eps | band | \\|D\\| | images with Q = 0 (test) | select AUPRC | test AUPRC (mistakes) | test AUROC (mistakes) |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for c in cals {
            for (i, r) in c.evaluation.sweep.iter().enumerate() {
                let chosen = c.evaluation.sweep_chosen == Some(i);
                let bold = |cell: String| if chosen { format!("**{cell}**") } else { cell };
                let _ = writeln!(
                    out,
                    "| {} | {} | {}-{} | {} | {} | {} | {} | {} |",
                    c.model,
                    bold(r.epsilon.to_string()),
                    r.percentiles.0,
                    r.percentiles.1,
                    r.discriminative,
                    pct(r.zero_share),
                    bold(opt(r.select.and_then(|s| s.auprc))),
                    bold(opt(r.misclassified.auprc)),
                    opt(r.misclassified.auroc)
                );
            }
        }
    }

    if cals.iter().any(|c| !c.evaluation.reliability.is_empty()) {
        let _ = writeln!(
            out,
            "\n#### Reliability of p_misclassified on the test part (10 equal-count bins: mean p -> observed error rate)\n"
        );
        let _ = writeln!(out, "| model | images per bin | bins, lowest p first |");
        let _ = writeln!(out, "|---|---:|---|");
        for c in cals {
            let bins = &c.evaluation.reliability;
            if bins.is_empty() {
                continue;
            }
            let cells: Vec<String> =
                bins.iter().map(|b| format!("{} -> {}", pct(b.p_mean), pct(b.error_rate))).collect();
            let _ = writeln!(out, "| {} | {} | {} |", c.model, bins[0].count, cells.join("; "));
        }
    }
    out
}

/// "mean ± sd (n)" of random-subset accuracies, or "-" when there were none (all d kept).
fn random_cell(values: &[f64], mean: f64, sd: f64) -> String {
    if values.is_empty() { "-".into() } else { format!("{} ± {} ({})", pct(mean), pct(sd), values.len()) }
}
