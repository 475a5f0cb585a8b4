//! Calibration proper, over embeddings already computed: design.md section 1, steps 2 to 7.
//! No I/O: embeddings and labels in, a [`Calibration`] out.

use anyhow::{Context, bail};
use ndarray::{Array2, ArrayView2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::dataset::Part;
use crate::{
    model::calibration::{
        BestLabelFree, Calibration, Compression, DataFingerprint, Distribution, EstimatorMetrics, Evaluation,
        FORMAT_VERSION, FlagMetrics, Histogram, Ranking, Reference, SweepRow, ThresholdRule,
    },
    qscore::{self, Discriminative, Score},
    risk::estimators::Sirc,
    risk::gaussian::Gaussian,
    risk::isotonic::IsotonicMap,
    risk::neighbours::Neighbours,
    risk::probe::{Probe, ProbeSettings},
    risk::stacked::{self, Stacked},
    risk::{self, RiskModel, RiskSource, ranking},
};

/// The embedded labelled set.
pub struct Embedded<'a> {
    /// One representation per row.
    pub h: ArrayView2<'a, f32>,
    /// Class of each row.
    pub labels: &'a [usize],
    /// Part of each row.
    pub parts: &'a [Part],
    /// Class names.
    pub classes: &'a [String],
    /// The user's own classifier's class for each row. When given, "misclassified" means
    /// predicted != label, on every part and for every figure, choice, map and threshold; the
    /// probe still trains on the fit part's labels. When `None`, the probe's mistakes.
    pub predicted: Option<&'a [usize]>,
    /// The user's classifier's probability for its own prediction, per row, in [0, 1]. When
    /// given, `user_confidence` is measured and is a candidate; otherwise it is not.
    pub confidence: Option<&'a [f32]>,
}

/// Folds of the stacked regression's cross-fitting on the select part.
const STACKED_FOLDS: usize = 5;

/// L2 penalty of the stacked regression (on standardised inputs; scikit-learn's C = 1).
const STACKED_ALPHA: f64 = 1.0;

/// The class-agnostic estimators SIRC may take as S2, in preference order on a tie. knn_distance
/// is left out: SIRC takes a and b from S2 on the fit part, and every fit image that is also a
/// k-NN reference finds itself at distance 0, so its fit-part distribution is biased low.
const SIRC_S2: [RiskSource; 2] = [RiskSource::L2Norm, RiskSource::Mahalanobis];

/// What calibration may choose and how.
#[derive(Debug, Clone)]
pub struct Settings {
    /// eps.
    pub epsilon: f32,
    /// (lo, hi) percentiles bounding D.
    pub percentiles: (f64, f64),
    /// Force this estimator instead of the best select AUPRC.
    pub risk_source: Option<RiskSource>,
    /// Choose tau for this precision instead of max F1.
    pub target_precision: Option<f64>,
    /// Neighbours that vote in the k-NN estimator.
    pub k: usize,
    /// Most fit images kept as the k-NN reference set (a seeded random sample when the fit
    /// part is larger): the set ships inside calibration.json and is searched per request.
    pub max_neighbours: usize,
    /// Probe training.
    pub probe: ProbeSettings,
    /// Random subsets in the compression comparison.
    pub random_subsets: usize,
    /// Seed of the random subsets.
    pub seed: u64,
    /// (eps, band) pairs to sweep the Q-Score over.
    pub sweep: Vec<(f32, (f64, f64))>,
}

/// Row indices of each part.
struct Parts {
    fit: Vec<usize>,
    select: Vec<usize>,
    test: Vec<usize>,
}

/// Everything measured on one held-out image.
struct Measured {
    score: Score,
    /// The classifier whose mistakes are predicted got it wrong.
    wrong: bool,
    /// The probe got it right.
    probe_right: bool,
    /// Risk value of every directly measured estimator, in the order of `direct`.
    risk: Vec<f32>,
}

/// One estimator's risk values on the select and the test part.
struct Column {
    source: RiskSource,
    select: Vec<f32>,
    test: Vec<f32>,
}

/// Runs calibration: D, the probe, every estimator on select and test, the choice, the map, tau,
/// the evaluation and the reference distributions.
pub fn calibrate(
    data: &Embedded,
    settings: &Settings,
    model: &str,
    fingerprint: DataFingerprint,
) -> anyhow::Result<Calibration> {
    let n = data.h.nrows();
    anyhow::ensure!(data.predicted.is_none_or(|p| p.len() == n), "one predicted class per image");
    anyhow::ensure!(data.confidence.is_none_or(|c| c.len() == n), "one confidence per image");
    let parts = Parts {
        fit: rows(data.parts, Part::Fit),
        select: rows(data.parts, Part::Select),
        test: rows(data.parts, Part::Test),
    };
    for (name, r) in [("fit", &parts.fit), ("select", &parts.select), ("test", &parts.test)] {
        if r.is_empty() {
            bail!("the {name} part is empty; give more images or change the fractions");
        }
    }
    let dim = data.h.ncols();
    let fit_h = data.h.select(Axis(0), &parts.fit);
    let fit_y: Vec<usize> = parts.fit.iter().map(|&i| data.labels[i]).collect();

    let (frequency, d_set) = discriminative(fit_h.view(), settings.epsilon, settings.percentiles)?;
    if d_set.is_empty() {
        bail!(
            "D is empty at eps {}: no fit image has a feature above mu + eps * sigma; lower --epsilon",
            settings.epsilon
        );
    }
    let mask = Discriminative::from_indices(&d_set, dim).expect("indices of A_j are below d");
    let probe = Probe::train(fit_h.view(), &fit_y, data.classes, settings.probe).context("the linear probe")?;
    let references = reference_rows(parts.fit.len(), settings.max_neighbours, settings.seed);
    let standard: Vec<f32> = references.iter().flat_map(|&r| probe.standardise(fit_h.row(r))).collect();
    let reference_y: Vec<usize> = references.iter().map(|&r| fit_y[r]).collect();
    let neighbours = Neighbours::new(settings.k, dim, &standard, &reference_y);
    let fit_z: Vec<f32> = fit_h.rows().into_iter().flat_map(|h| probe.standardise(h)).collect();
    let gaussian = Gaussian::fit(&fit_z, dim);
    drop(fit_z);
    let base =
        RiskModel { probe: &probe, neighbours: &neighbours, gaussian: gaussian.as_ref(), sirc: None, stacked: None };

    // Every estimator measured as such; SIRC and the stacked model are built from these below.
    let direct: Vec<RiskSource> = RiskSource::ALL
        .into_iter()
        .filter(|&s| match s {
            RiskSource::Sirc | RiskSource::Stacked => false,
            RiskSource::UserConfidence => data.confidence.is_some(),
            RiskSource::Mahalanobis => gaussian.is_some(),
            _ => true,
        })
        .collect();
    let position = |s: RiskSource| direct.iter().position(|&d| d == s);
    let measure = |rows: &[usize]| -> anyhow::Result<Vec<Measured>> {
        rows.iter()
            .map(|&i| {
                let h = data.h.row(i);
                let score = qscore::score(h, settings.epsilon, &mask).with_context(|| format!("image {i}"))?;
                let user = data.confidence.map(|c| c[i]);
                let measured = risk::measure(h, &score, &base, &direct, user)
                    .map_err(|_| anyhow::anyhow!("image {i} has no classifier confidence (NaN)"))?;
                let probe_right = measured.prediction.class == data.labels[i];
                let wrong = match data.predicted {
                    Some(p) => p[i] != data.labels[i],
                    None => !probe_right,
                };
                Ok(Measured { wrong, probe_right, score, risk: measured.risks })
            })
            .collect()
    };
    let select = measure(&parts.select)?;
    let test = measure(&parts.test)?;

    let wrong = |m: &[Measured]| m.iter().map(|x| x.wrong).collect::<Vec<bool>>();
    let (select_wrong, test_wrong) = (wrong(&select), wrong(&test));
    if !select_wrong.contains(&true) {
        bail!("the classifier made no mistake on the select part, so there is nothing to calibrate a flag on");
    }
    let mut columns: Vec<Column> = direct
        .iter()
        .enumerate()
        .map(|(c, &source)| Column {
            source,
            select: select.iter().map(|m| m.risk[c]).collect(),
            test: test.iter().map(|m| m.risk[c]).collect(),
        })
        .collect();
    let select_auprc_of = |v: &[f32]| ranking::auprc(&widen(v), &select_wrong);

    // SIRC: a and b from S2 on the fit part, S2 the one whose SIRC ranks select best.
    let softmax = position(RiskSource::MaxSoftmax).expect("max_softmax is always measured");
    let mut sirc: Option<(Sirc, Column, Option<f64>)> = None;
    for s2 in SIRC_S2 {
        let Some(c) = position(s2) else { continue };
        let fit_confidence = parts
            .fit
            .iter()
            .map(|&i| {
                let h = data.h.row(i);
                let score = qscore::score(h, settings.epsilon, &mask).with_context(|| format!("fit image {i}"))?;
                let m = risk::measure(h, &score, &base, &[s2], None).expect("S2 needs no client input");
                Ok(-f64::from(m.risks[0]))
            })
            .collect::<anyhow::Result<Vec<f64>>>()?;
        let Some(params) = Sirc::fit(s2, &fit_confidence) else { continue };
        let on = |m: &[Measured]| m.iter().map(|x| params.risk(x.risk[softmax], x.risk[c])).collect::<Vec<f32>>();
        let column = Column { source: RiskSource::Sirc, select: on(&select), test: on(&test) };
        let auprc = select_auprc_of(&column.select);
        if sirc.as_ref().is_none_or(|(_, _, best)| auprc > *best) {
            sirc = Some((params, column, auprc));
        }
    }
    let sirc = sirc.map(|(params, column, _)| {
        columns.push(column);
        params
    });

    // The stacked regression over every direct estimator whose select values are all finite.
    let inputs: Vec<(usize, RiskSource)> = direct
        .iter()
        .enumerate()
        .filter(|&(c, _)| select.iter().all(|m| m.risk[c].is_finite()))
        .map(|(c, &s)| (c, s))
        .collect();
    let input_sources: Vec<RiskSource> = inputs.iter().map(|&(_, s)| s).collect();
    let matrix = |m: &[Measured]| Array2::from_shape_fn((m.len(), inputs.len()), |(r, j)| m[r].risk[inputs[j].0]);
    let select_x = matrix(&select);
    let stacked =
        stacked::cross_fit(&input_sources, select_x.view(), &select_wrong, STACKED_FOLDS, settings.seed, STACKED_ALPHA)
            .zip(Stacked::fit(&input_sources, select_x.view(), &select_wrong, STACKED_ALPHA))
            .map(|(out_of_fold, model)| {
                let test_x = matrix(&test);
                let on_test =
                    test_x.rows().into_iter().map(|r| model.risk(r.as_slice().expect("standard layout"))).collect();
                columns.push(Column { source: RiskSource::Stacked, select: out_of_fold, test: on_test });
                model
            });

    // Choose on select, report on test. Ties go to the earlier estimator, and the stacked
    // model comes last, so it is chosen only when its cross-fitted AUPRC beats every single one.
    let select_auprc: Vec<Option<f64>> = columns.iter().map(|c| select_auprc_of(&c.select)).collect();
    let chosen = match settings.risk_source {
        Some(forced) => forced,
        None => {
            let best = (0..columns.len())
                .filter_map(|s| select_auprc[s].map(|a| (s, a)))
                .fold(None, |best: Option<(usize, f64)>, (s, a)| match best {
                    Some((_, b)) if b >= a => best,
                    _ => Some((s, a)),
                })
                .map(|(s, _)| s)
                .context("no estimator has an AUPRC on the select part")?;
            columns[best].source
        }
    };
    let c = columns.iter().position(|col| col.source == chosen).with_context(|| {
        format!(
            "risk source {chosen} could not be measured on this data (user_confidence needs a confidence per image)"
        )
    })?;
    let isotonic = IsotonicMap::fit(
        &widen(&columns[c].select),
        &select_wrong.iter().map(|&w| f64::from(u8::from(w))).collect::<Vec<_>>(),
    )
    .context("no finite risk value on the select part")?;
    let p = |v: &[f32]| v.iter().map(|&x| f64::from(isotonic.apply(x))).collect::<Vec<f64>>();
    let select_p = p(&columns[c].select);
    let (threshold, threshold_rule) = match settings.target_precision {
        None => {
            (ranking::max_f1(&select_p, &select_wrong).expect("select has a mistake").threshold, ThresholdRule::MaxF1)
        }
        Some(target) => match ranking::at_precision(&select_p, &select_wrong, target) {
            Some(op) => (op.threshold, ThresholdRule::TargetPrecision { target }),
            None => bail!(
                "no threshold reaches precision {target} on the select part (the best is {:.3}); lower --target-precision",
                ranking::precision_recall(&select_p, &select_wrong)
                    .into_iter()
                    .flatten()
                    .map(|o| o.precision)
                    .fold(0.0, f64::max)
            ),
        },
    };
    let threshold = threshold as f32;

    let test_p = p(&columns[c].test);
    let estimators: Vec<EstimatorMetrics> = columns
        .iter()
        .zip(&select_auprc)
        .map(|(col, &select_auprc)| {
            let r = widen(&col.test);
            EstimatorMetrics {
                source: col.source,
                auroc: ranking::auroc(&r, &test_wrong),
                auprc: ranking::auprc(&r, &test_wrong),
                select_auprc,
            }
        })
        .collect();
    let test_right: Vec<bool> = test_wrong.iter().map(|w| !w).collect();
    let q: Vec<f64> = test.iter().map(|m| f64::from(m.score.q_score)).collect();
    let error_rate = rate(&test_wrong);
    let best_label_free = BestLabelFree::of(&estimators, error_rate);

    let test_h = data.h.select(Axis(0), &parts.test);
    let test_y: Vec<usize> = parts.test.iter().map(|&i| data.labels[i]).collect();
    let accuracy_all = rate(&test.iter().map(|m| m.probe_right).collect::<Vec<bool>>());
    let compression = compression(&fit_h, &fit_y, &test_h, &test_y, &d_set, accuracy_all, data.classes, settings)?;
    let sweep = settings
        .sweep
        .iter()
        .map(|&(eps, band)| sweep_row(&fit_h, &test_h, &test_wrong, eps, band))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let reference_q: Vec<f32> = select.iter().chain(&test).map(|m| m.score.q_score).collect();
    let reference_p: Vec<f32> = select_p.iter().chain(&test_p).map(|&v| v as f32).collect();
    let reference = Reference {
        images: reference_q.len(),
        flagged_rate: reference_p.iter().filter(|&&v| v >= threshold).count() as f64 / reference_p.len() as f64,
        q_score: distribution(&reference_q),
        p_misclassified: distribution(&reference_p),
    };

    let evaluation = Evaluation {
        seed: settings.seed,
        fit_images: parts.fit.len(),
        select_images: parts.select.len(),
        test_images: parts.test.len(),
        probe_accuracy: accuracy_all,
        error_rate,
        estimators,
        best_label_free,
        q_score_for_correct: Ranking {
            auroc: ranking::auroc(&q, &test_right),
            auprc: ranking::auprc(&q, &test_right),
            base_rate: rate(&test_right),
        },
        p_misclassified: Ranking {
            auroc: ranking::auroc(&test_p, &test_wrong),
            auprc: ranking::auprc(&test_p, &test_wrong),
            base_rate: error_rate,
        },
        flag: flag_metrics(&test_p, &test_wrong, threshold),
        compression,
        sweep,
    };

    Ok(Calibration {
        format_version: FORMAT_VERSION,
        model: model.to_owned(),
        epsilon: settings.epsilon,
        percentiles: settings.percentiles,
        activation_frequency: frequency,
        discriminative_features: d_set,
        probe,
        neighbours,
        gaussian,
        sirc,
        stacked,
        risk_source: chosen,
        isotonic,
        threshold,
        threshold_rule,
        reference,
        evaluation,
        data: fingerprint,
    })
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Which fit rows form the k-NN reference set: all of them, or a seeded sample of `max`.
fn reference_rows(n: usize, max: usize, seed: u64) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    let mut rows = rand::seq::index::sample(&mut ChaCha8Rng::seed_from_u64(seed), n, max).into_vec();
    rows.sort_unstable();
    rows
}

fn rows(parts: &[Part], part: Part) -> Vec<usize> {
    parts.iter().enumerate().filter(|&(_, &p)| p == part).map(|(i, _)| i).collect()
}

fn rate(flags: &[bool]) -> f64 {
    flags.iter().filter(|&&f| f).count() as f64 / flags.len().max(1) as f64
}

/// A_j over the fit part and the discriminative set D it gives.
fn discriminative(fit: ArrayView2<f32>, epsilon: f32, (lo, hi): (f64, f64)) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
    let frequency = qscore::activation_frequency(fit, epsilon)
        .map_err(|(i, e)| anyhow::anyhow!("fit image {i} cannot be scored: {e}"))?;
    let d_set = qscore::discriminative_set(&frequency, lo, hi);
    Ok((frequency, d_set))
}

/// `f` over `items` on every core, answers in input order. Each probe fit is single-threaded
/// and independent of the others, so this is where calibration's time goes down.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(items.len().max(1));
    let per = items.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> =
            items.chunks(per).map(|chunk| scope.spawn(|| chunk.iter().map(&f).collect::<Vec<R>>())).collect();
        handles.into_iter().flat_map(|h| h.join().expect("a calibration thread panicked")).collect()
    })
}

/// The probe's test accuracy when it sees only `features`.
fn accuracy_on(
    fit: &Array2<f32>,
    fit_y: &[usize],
    test: &Array2<f32>,
    test_y: &[usize],
    features: &[usize],
    classes: &[String],
    settings: ProbeSettings,
) -> anyhow::Result<f64> {
    let probe = Probe::train(fit.select(Axis(1), features).view(), fit_y, classes, settings)?;
    let test = test.select(Axis(1), features);
    let right = test.axis_iter(Axis(0)).zip(test_y).filter(|(h, y)| probe.predict(*h).class == **y).count();
    Ok(right as f64 / test_y.len() as f64)
}

#[allow(clippy::too_many_arguments)]
fn compression(
    fit: &Array2<f32>,
    fit_y: &[usize],
    test: &Array2<f32>,
    test_y: &[usize],
    d_set: &[usize],
    accuracy_all: f64,
    classes: &[String],
    settings: &Settings,
) -> anyhow::Result<Compression> {
    let dim = fit.ncols();
    let accuracy_discriminative = accuracy_on(fit, fit_y, test, test_y, d_set, classes, settings.probe)?;
    let seeds: Vec<u64> = (0..settings.random_subsets as u64).collect();
    let accuracy_random = parallel_map(&seeds, |&s| {
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed.wrapping_add(s));
        let mut subset = rand::seq::index::sample(&mut rng, dim, d_set.len()).into_vec();
        subset.sort_unstable();
        accuracy_on(fit, fit_y, test, test_y, &subset, classes, settings.probe)
    })
    .into_iter()
    .collect::<anyhow::Result<Vec<f64>>>()?;
    let n = accuracy_random.len() as f64;
    let mean = accuracy_random.iter().sum::<f64>() / n.max(1.0);
    let sd = if n > 1.0 {
        (accuracy_random.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    Ok(Compression {
        dim,
        discriminative: d_set.len(),
        kept_ratio: d_set.len() as f64 / dim as f64,
        accuracy_all,
        accuracy_discriminative,
        accuracy_random,
        accuracy_random_mean: mean,
        accuracy_random_sd: sd,
    })
}

/// The Q-Score at another (eps, band): D refitted on the fit part, Q measured on the test part.
fn sweep_row(
    fit: &Array2<f32>,
    test: &Array2<f32>,
    test_wrong: &[bool],
    epsilon: f32,
    band: (f64, f64),
) -> anyhow::Result<SweepRow> {
    let (_, d_set) = discriminative(fit.view(), epsilon, band)?;
    let mask = Discriminative::from_indices(&d_set, fit.ncols()).expect("indices of A_j are below d");
    let q: Vec<f64> = qscore::score_batch(test.view(), epsilon, &mask)
        .into_iter()
        .map(|s| s.map(|s| f64::from(s.q_score)))
        .collect::<Result<_, _>>()?;
    let risk: Vec<f64> = q.iter().map(|v| -v).collect();
    Ok(SweepRow {
        epsilon,
        percentiles: band,
        discriminative: d_set.len(),
        zero_share: q.iter().filter(|&&v| v == 0.0).count() as f64 / q.len() as f64,
        misclassified: Ranking {
            auroc: ranking::auroc(&risk, test_wrong),
            auprc: ranking::auprc(&risk, test_wrong),
            base_rate: rate(test_wrong),
        },
    })
}

/// The flag at tau: precision, recall, and the error rates on either side of it.
fn flag_metrics(p: &[f64], wrong: &[bool], threshold: f32) -> FlagMetrics {
    let operating = ranking::operating_at(p, wrong, f64::from(threshold));
    let side = |flagged: bool| {
        let picked: Vec<bool> =
            p.iter().zip(wrong).filter(|&(&v, _)| (v >= f64::from(threshold)) == flagged).map(|(_, &w)| w).collect();
        (!picked.is_empty()).then(|| rate(&picked))
    };
    let (flagged, unflagged) = (side(true), side(false));
    FlagMetrics {
        operating,
        error_rate_flagged: flagged.unwrap_or(0.0),
        error_rate_unflagged: unflagged.unwrap_or(0.0),
        lift: flagged.zip(unflagged).and_then(|(f, u)| (u > 0.0).then(|| f / u)),
    }
}

/// Percentiles 0..=100 and a 20-bin histogram.
fn distribution(values: &[f32]) -> Distribution {
    let mut sorted = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    let percentiles = (0..=100).filter_map(|q| qscore::percentile(&sorted, f64::from(q)).map(|v| v as f32)).collect();
    Distribution { percentiles, histogram: histogram(&sorted, 20) }
}

fn histogram(sorted: &[f32], bins: usize) -> Histogram {
    let (Some(&lo), Some(&hi)) = (sorted.first(), sorted.last()) else {
        return Histogram { edges: Vec::new(), counts: Vec::new() };
    };
    let width = if hi > lo { (hi - lo) / bins as f32 } else { 1.0 };
    let edges: Vec<f32> = (0..=bins).map(|b| lo + width * b as f32).collect();
    let mut counts = vec![0_u64; bins];
    for &v in sorted {
        let b = (((v - lo) / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    Histogram { edges, counts }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 8-d representations of two classes with one spike each: class 0 spikes on feature 0,
    /// class 1 on feature 1, plus a fifth of "hard" images with a weak spike on the other
    /// class's feature (no linear probe separates those). The probe misclassifies the hard ones; their Q-Score is low; calibration must
    /// find the mistakes with a high AUPRC, flag them, and report every estimator.
    fn toy() -> (Array2<f32>, Vec<usize>, Vec<Part>) {
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        let mut parts = Vec::new();
        for i in 0..240 {
            let (class, pair) = (i % 2, i / 2);
            let hard = pair % 5 == 4;
            let mut h = vec![0.1_f32; 8];
            // Noise that says nothing about class or hardness.
            h[2 + (pair / 5) % 5] = 0.2 + (pair % 7) as f32 * 0.03;
            let strength = 5.0 + (i % 11) as f32 * 0.3;
            if hard {
                h[1 - class] = 1.0 + (i % 3) as f32 * 0.1;
            } else {
                h[class] = strength;
            }
            rows.extend(h);
            labels.push(class);
            parts.push(match pair % 4 {
                0 | 1 => Part::Fit,
                2 => Part::Select,
                _ => Part::Test,
            });
        }
        (Array2::from_shape_vec((240, 8), rows).unwrap(), labels, parts)
    }

    #[test]
    fn finds_the_mistakes_on_a_toy_set() {
        let (h, labels, parts) = toy();
        let classes = vec!["zero".to_string(), "one".to_string()];
        let settings = Settings {
            epsilon: 1.0,
            percentiles: (0.0, 100.0),
            risk_source: None,
            target_precision: None,
            k: 5,
            max_neighbours: 1000,
            probe: ProbeSettings::default(),
            random_subsets: 3,
            seed: 0,
            sweep: vec![(1.5, (0.0, 100.0))],
        };
        let data = Embedded {
            h: h.view(),
            labels: &labels,
            parts: &parts,
            classes: &classes,
            predicted: None,
            confidence: None,
        };
        let fp = DataFingerprint {
            sources: vec![],
            classes: classes.clone(),
            fit_per_class: vec![],
            select_per_class: vec![],
            test_per_class: vec![],
            file_list_sha256: String::new(),
            skipped: vec![],
        };
        let cal = calibrate(&data, &settings, "toy", fp).unwrap();
        let e = &cal.evaluation;
        assert_eq!((e.fit_images, e.select_images, e.test_images), (120, 60, 60));
        assert!(e.error_rate > 0.1 && e.error_rate < 0.4, "the hard fifth is misclassified: {}", e.error_rate);
        assert!(e.p_misclassified.auprc.unwrap() > 0.9, "{:?}", e.p_misclassified);
        assert!(e.flag.lift.is_none_or(|l| l > 3.0) && e.flag.operating.recall > 0.9, "{:?}", e.flag);
        // Every estimator but user_confidence (no confidences given).
        let measured: Vec<RiskSource> = e.estimators.iter().map(|m| m.source).collect();
        assert_eq!(
            measured,
            RiskSource::ALL.into_iter().filter(|&s| s != RiskSource::UserConfidence).collect::<Vec<_>>()
        );
        assert!(cal.gaussian.is_some() && cal.sirc.is_some() && cal.stacked.is_some());
        assert!(e.estimators.iter().all(|m| m.auprc.is_some() && m.select_auprc.is_some()), "{:?}", e.estimators);
        let best = e.best_label_free.unwrap();
        assert!(best.source.label_free() && best.base_rate == e.error_rate);
        assert!(!cal.needs_user_confidence());
        // The report lists every estimator measured and gives the best label-free one its row.
        let md = super::super::report::markdown(&[&cal]);
        for m in &e.estimators {
            assert!(md.contains(&format!("| {} ", m.source)) || md.contains(&format!(" {} |", m.source)), "{md}");
        }
        assert!(md.contains("Best label-free estimator") && md.contains(&format!("| toy | {} |", best.source)), "{md}");
        assert_eq!(cal.discriminative_features, vec![0, 1], "the spikes are the discriminative features");
        assert_eq!(e.compression.discriminative, 2);
        assert_eq!(e.compression.accuracy_random.len(), 3);
        assert_eq!(e.sweep.len(), 1);
        assert_eq!(cal.reference.q_score.percentiles.len(), 101);
        // The served assessment agrees with the measured one for every test row.
        let test_rows: Vec<usize> = rows(&parts, Part::Test);
        let mask = cal.discriminative_set(8).unwrap();
        let flagged = test_rows
            .iter()
            .filter(|&&i| {
                let s = qscore::score(h.row(i), cal.epsilon, &mask).unwrap();
                cal.assess(h.row(i), &s, None).unwrap().likely_misclassified
            })
            .count();
        assert!((flagged as f64 / 60.0 - e.flag.operating.flagged_rate).abs() < 1e-9);
        assert_eq!(cal.probe.predict(h.row(0)).class, 0);
        // Same inputs, same file.
        let again = calibrate(&data, &settings, "toy", cal.data.clone()).unwrap();
        assert_eq!(serde_json::to_string(&again).unwrap(), serde_json::to_string(&cal).unwrap());
        // Forced onto each combination, the served flag still agrees with the measured one.
        for forced in [RiskSource::Stacked, RiskSource::Sirc, RiskSource::Mahalanobis, RiskSource::KnnDistance] {
            let cal =
                calibrate(&data, &Settings { risk_source: Some(forced), ..settings.clone() }, "toy", cal.data.clone())
                    .unwrap();
            let flagged = test_rows
                .iter()
                .filter(|&&i| {
                    let s = qscore::score(h.row(i), cal.epsilon, &mask).unwrap();
                    cal.assess(h.row(i), &s, None).unwrap().likely_misclassified
                })
                .count();
            let rate = cal.evaluation.flag.operating.flagged_rate;
            assert!((flagged as f64 / 60.0 - rate).abs() < 1e-9, "{forced}: {flagged} vs {rate}");
            let back = Calibration::parse(&serde_json::to_string(&cal).unwrap(), 8).unwrap();
            assert_eq!(back.risk_source, forced);
        }
    }

    /// The user's own classifier: it is wrong on every seventh image (whatever the probe does)
    /// and says so through a low confidence. "Misclassified" follows its predictions on every
    /// part, user_confidence is measured, ranks them perfectly and is chosen, and the flag then
    /// needs the confidence at serving time.
    #[test]
    fn follows_the_users_classifier() {
        let (h, labels, parts) = toy();
        let classes = vec!["zero".to_string(), "one".to_string()];
        let user_wrong: Vec<bool> = (0..labels.len()).map(|i| i % 7 == 3).collect();
        let predicted: Vec<usize> = labels.iter().zip(&user_wrong).map(|(&l, &w)| if w { 1 - l } else { l }).collect();
        let confidence: Vec<f32> =
            user_wrong.iter().enumerate().map(|(i, &w)| if w { 0.55 } else { 0.8 + (i % 5) as f32 * 0.04 }).collect();
        let settings = Settings {
            epsilon: 1.0,
            percentiles: (0.0, 100.0),
            risk_source: None,
            target_precision: None,
            k: 5,
            max_neighbours: 1000,
            probe: ProbeSettings::default(),
            random_subsets: 1,
            seed: 0,
            sweep: vec![],
        };
        let fp = DataFingerprint {
            sources: vec![],
            classes: classes.clone(),
            fit_per_class: vec![],
            select_per_class: vec![],
            test_per_class: vec![],
            file_list_sha256: String::new(),
            skipped: vec![],
        };
        let data = Embedded {
            h: h.view(),
            labels: &labels,
            parts: &parts,
            classes: &classes,
            predicted: Some(&predicted),
            confidence: Some(&confidence),
        };
        let cal = calibrate(&data, &settings, "toy", fp.clone()).unwrap();
        let e = &cal.evaluation;
        let test_rows = rows(&parts, Part::Test);
        let expected = test_rows.iter().filter(|&&i| user_wrong[i]).count() as f64 / test_rows.len() as f64;
        assert!((e.error_rate - expected).abs() < 1e-12, "{} vs {expected}", e.error_rate);
        assert!(e.probe_accuracy < 0.9, "the probe's own accuracy is still reported: {}", e.probe_accuracy);
        assert_eq!(cal.risk_source, RiskSource::UserConfidence);
        let user = e.estimators.iter().find(|m| m.source == RiskSource::UserConfidence).unwrap();
        assert_eq!((user.auprc, user.auroc), (Some(1.0), Some(1.0)));
        assert!(cal.needs_user_confidence());
        let mask = cal.discriminative_set(8).unwrap();
        let i = test_rows[0];
        let s = qscore::score(h.row(i), cal.epsilon, &mask).unwrap();
        assert_eq!(cal.assess(h.row(i), &s, None).unwrap_err(), crate::risk::MissingConfidence);
        assert!(cal.assess(h.row(i), &s, Some(0.55)).unwrap().likely_misclassified);
        assert!(!cal.assess(h.row(i), &s, Some(0.9)).unwrap().likely_misclassified);
        // Without confidences, user_confidence is no candidate, and forcing it is refused.
        let data = Embedded { confidence: None, ..data };
        let cal = calibrate(&data, &settings, "toy", fp.clone()).unwrap();
        assert!(cal.evaluation.estimators.iter().all(|m| m.source != RiskSource::UserConfidence));
        let forced = Settings { risk_source: Some(RiskSource::UserConfidence), ..settings };
        assert!(calibrate(&data, &forced, "toy", fp).unwrap_err().to_string().contains("confidence"));
    }
}
