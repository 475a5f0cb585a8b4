//! Calibration proper, over embeddings already computed: design.md section 1, steps 2 to 7.
//! No I/O: embeddings and labels in, a [`Calibration`] out.

use anyhow::{Context, bail};
use ndarray::{Array2, ArrayView2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::dataset::Part;
use crate::{
    model::calibration::{
        BestLabelFree, Calibration, Compression, CurvePoint, DataFingerprint, Distribution, EstimatorMetrics,
        Evaluation, FORMAT_VERSION, FlagMetrics, Histogram, Ranking, Reference, ReliabilityBin, SubsetAccuracy,
        SweepRow, Target, ThresholdRule,
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
    /// Random subsets in the compression comparison (for D, for A_j > 0 and at each point of
    /// the curve).
    pub random_subsets: usize,
    /// Shares of the d features kept on the compression curve, each in (0, 1] (e.g. 0.4, 0.5,
    /// ..., 1.0); empty for no curve. Each point below 1 costs 1 + `random_subsets` probe fits.
    pub curve_fractions: Vec<f64>,
    /// Prior strength a (images) of the isotonic map's shrinkage toward the select error rate;
    /// 0 for scikit-learn's plain map.
    pub isotonic_prior: f64,
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
    let isotonic = IsotonicMap::fit_shrunk(
        &widen(&columns[c].select),
        &select_wrong.iter().map(|&w| f64::from(u8::from(w))).collect::<Vec<_>>(),
        settings.isotonic_prior,
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
    let threshold = between_plateaus(&select_p, threshold);

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
    let fitted = Fitted { fit: &fit_h, fit_y: &fit_y, test: &test_h, test_y: &test_y, classes: data.classes };
    let compression = compression(&fitted, &probe, &frequency, &d_set, settings)?;
    let select_h = data.h.select(Axis(0), &parts.select);
    let sweep = settings
        .sweep
        .iter()
        .map(|&(eps, band)| sweep_row(&fit_h, (&select_h, &select_wrong), (&test_h, &test_wrong), eps, band))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sweep_chosen = best_select_row(&sweep);

    let reference_q: Vec<f32> = select.iter().chain(&test).map(|m| m.score.q_score).collect();
    let reference_p: Vec<f32> = select_p.iter().chain(&test_p).map(|&v| v as f32).collect();
    // The embedding drift test's reference: a seeded sample of the held-out embeddings (all of
    // them when fewer), with its kernel bandwidth.
    const EMBEDDING_SAMPLE: usize = 500;
    let held_out: Vec<usize> = parts.select.iter().chain(&parts.test).copied().collect();
    let sampled: Vec<f32> = reference_rows(held_out.len(), EMBEDDING_SAMPLE, settings.seed)
        .into_iter()
        .flat_map(|r| data.h.row(held_out[r]).to_vec())
        .collect();
    let reference = Reference {
        images: reference_q.len(),
        flagged_rate: reference_p.iter().filter(|&&v| v >= threshold).count() as f64 / reference_p.len() as f64,
        q_score: distribution(&reference_q),
        p_misclassified: distribution(&reference_p),
        embedding: (held_out.len() >= 2)
            .then(|| crate::drift::embedding::EmbeddingSample::new(&sampled, dim, settings.seed)),
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
        sweep_chosen,
        reliability: reliability(&test_p, &test_wrong, RELIABILITY_BINS),
        isotonic_prior: settings.isotonic_prior,
    };

    Ok(Calibration {
        format_version: FORMAT_VERSION,
        sha256: String::new(),
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
        target: Target::Probe,
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
/// and independent of the others, so this is where calibration's time goes down. Threads take
/// the next item as they finish one: probe fits on 40% and on 90% of the features differ in
/// cost, and fixed chunks would leave a core idle.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(items.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break mine };
                        mine.push((i, f(item)));
                    }
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a calibration thread panicked")).collect()
    });
    done.sort_by_key(|&(i, _)| i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The labelled fit and test representations the compression probes train and test on.
struct Fitted<'a> {
    fit: &'a Array2<f32>,
    fit_y: &'a [usize],
    test: &'a Array2<f32>,
    test_y: &'a [usize],
    classes: &'a [String],
}

/// The probe's test accuracy when it sees only `features`.
fn accuracy_on(data: &Fitted, features: &[usize], settings: ProbeSettings) -> anyhow::Result<f64> {
    let probe = Probe::train(data.fit.select(Axis(1), features).view(), data.fit_y, data.classes, settings)?;
    Ok(probe_accuracy(&probe, &data.test.select(Axis(1), features), data.test_y))
}

fn probe_accuracy(probe: &Probe, test: &Array2<f32>, test_y: &[usize]) -> f64 {
    let right = test.axis_iter(Axis(0)).zip(test_y).filter(|(h, y)| probe.predict(*h).class == **y).count();
    right as f64 / test_y.len().max(1) as f64
}

/// Feature indices by descending A_j, ties by ascending index: the paper's "discriminative"
/// ranking (how often a feature is highly activating), which the compression curve keeps a
/// prefix of.
fn ranked_by_frequency(frequency: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..frequency.len()).collect();
    order.sort_by(|&a, &b| frequency[b].total_cmp(&frequency[a]).then(a.cmp(&b)));
    order
}

/// Mean and sample standard deviation (0 with fewer than two values).
fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n.max(1.0);
    let sd = if n > 1.0 { (values.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (mean, sd)
}

/// Probe accuracy on chosen feature subsets against random subsets of the same sizes: D, the
/// features with A_j > 0, and the top-A_j curve. Every probe fit of all three goes through one
/// [`parallel_map`]. A subset of all d features is not refitted: its accuracy is the shipped
/// probe's, and random subsets of d are the same features.
fn compression(
    data: &Fitted,
    probe: &Probe,
    frequency: &[f32],
    d_set: &[usize],
    settings: &Settings,
) -> anyhow::Result<Compression> {
    let dim = data.fit.ncols();
    let accuracy_all = probe_accuracy(probe, data.test, data.test_y);
    let active: Vec<usize> = (0..dim).filter(|&j| frequency[j] > 0.0).collect();
    let ranked = ranked_by_frequency(frequency);
    let curve_sizes: Vec<(f64, usize)> =
        settings.curve_fractions.iter().map(|&f| (f, ((f * dim as f64).round() as usize).clamp(1, dim))).collect();

    // Each chosen subset, then its random twins; `groups` remembers where each one's fits are.
    let mut jobs: Vec<Vec<usize>> = Vec::new();
    let mut groups: Vec<Option<std::ops::Range<usize>>> = Vec::new();
    let chosen_sets = std::iter::once(d_set.to_vec()).chain(std::iter::once(active.clone())).chain(
        curve_sizes.iter().map(|&(_, k)| {
            let mut top = ranked[..k].to_vec();
            top.sort_unstable();
            top
        }),
    );
    for chosen in chosen_sets {
        if chosen.len() == dim || chosen.is_empty() {
            groups.push(None);
            continue;
        }
        let start = jobs.len();
        let k = chosen.len();
        jobs.push(chosen);
        for s in 0..settings.random_subsets as u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(settings.seed.wrapping_add(s));
            let mut subset = rand::seq::index::sample(&mut rng, dim, k).into_vec();
            subset.sort_unstable();
            jobs.push(subset);
        }
        groups.push(Some(start..jobs.len()));
    }
    tracing::info!(fits = jobs.len(), "compression: probe fits on feature subsets");
    let accuracy = parallel_map(&jobs, |features| accuracy_on(data, features, settings.probe))
        .into_iter()
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let subset = |group: &Option<std::ops::Range<usize>>, kept: usize| match group {
        Some(r) => {
            let random = accuracy[r.start + 1..r.end].to_vec();
            let (mean, sd) = mean_sd(&random);
            SubsetAccuracy {
                kept,
                accuracy: accuracy[r.start],
                accuracy_random: random,
                accuracy_random_mean: mean,
                accuracy_random_sd: sd,
            }
        }
        // All d features (or none): nothing to compare with.
        None => SubsetAccuracy {
            kept,
            accuracy: if kept == 0 { 0.0 } else { accuracy_all },
            accuracy_random: Vec::new(),
            accuracy_random_mean: if kept == 0 { 0.0 } else { accuracy_all },
            accuracy_random_sd: 0.0,
        },
    };
    let on_d = subset(&groups[0], d_set.len());
    let curve = curve_sizes
        .iter()
        .zip(&groups[2..])
        .map(|(&(fraction, k), g)| CurvePoint { fraction, subset: subset(g, k) })
        .collect();
    Ok(Compression {
        dim,
        discriminative: d_set.len(),
        kept_ratio: d_set.len() as f64 / dim as f64,
        accuracy_all,
        accuracy_discriminative: on_d.accuracy,
        accuracy_random: on_d.accuracy_random,
        accuracy_random_mean: on_d.accuracy_random_mean,
        accuracy_random_sd: on_d.accuracy_random_sd,
        active: Some(subset(&groups[1], active.len())),
        curve,
    })
}

/// The Q-Score at another (eps, band): D refitted on the fit part, Q measured on the select and
/// the test parts. `select` and `test` are (representations, whether each image is a mistake),
/// the mistakes exactly those calibration computed.
fn sweep_row(
    fit: &Array2<f32>,
    select: (&Array2<f32>, &[bool]),
    test: (&Array2<f32>, &[bool]),
    epsilon: f32,
    band: (f64, f64),
) -> anyhow::Result<SweepRow> {
    let (_, d_set) = discriminative(fit.view(), epsilon, band)?;
    let mask = Discriminative::from_indices(&d_set, fit.ncols()).expect("indices of A_j are below d");
    let q_of = |h: &Array2<f32>| -> anyhow::Result<Vec<f64>> {
        Ok(qscore::score_batch(h.view(), epsilon, &mask)
            .into_iter()
            .map(|s| s.map(|s| f64::from(s.q_score)))
            .collect::<Result<_, _>>()?)
    };
    let ranking_of = |q: &[f64], wrong: &[bool]| {
        let risk: Vec<f64> = q.iter().map(|v| -v).collect();
        Ranking { auroc: ranking::auroc(&risk, wrong), auprc: ranking::auprc(&risk, wrong), base_rate: rate(wrong) }
    };
    let (q_select, q_test) = (q_of(select.0)?, q_of(test.0)?);
    Ok(SweepRow {
        epsilon,
        percentiles: band,
        discriminative: d_set.len(),
        zero_share: q_test.iter().filter(|&&v| v == 0.0).count() as f64 / q_test.len() as f64,
        misclassified: ranking_of(&q_test, test.1),
        select: Some(ranking_of(&q_select, select.1)),
    })
}

/// The sweep row with the best AUPRC for mistakes on the select part, the first among equals.
fn best_select_row(rows: &[SweepRow]) -> Option<usize> {
    rows.iter()
        .enumerate()
        .filter_map(|(i, r)| r.select.and_then(|s| s.auprc).map(|a| (i, a)))
        .fold(None, |best: Option<(usize, f64)>, (i, a)| match best {
            Some((_, b)) if b >= a => best,
            _ => Some((i, a)),
        })
        .map(|(i, _)| i)
}

/// tau from the chosen select operating point: halfway between its p and the next lower p on
/// select ([`ranking::midway_below`]), so the same select images are flagged and none sits on
/// tau. If f32 rounding would move the line past a select value, the chosen p itself.
fn between_plateaus(select_p: &[f64], chosen: f64) -> f32 {
    let flagged = |t: f64| select_p.iter().filter(|&&v| v >= t).count();
    let tau = ranking::midway_below(select_p, chosen) as f32;
    if flagged(f64::from(tau)) == flagged(chosen) { tau } else { chosen as f32 }
}

/// Bins of the reliability diagram.
const RELIABILITY_BINS: usize = 10;

/// A reliability diagram of `p` against `wrong`: the images sorted by p (ties in input order)
/// and cut into `bins` runs of equal count (sizes differ by at most one; fewer bins when there
/// are fewer images). Each bin's mean p against its share of mistakes.
fn reliability(p: &[f64], wrong: &[bool], bins: usize) -> Vec<ReliabilityBin> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let (n, bins) = (p.len(), bins.min(p.len()));
    (0..bins)
        .map(|b| {
            let members = &order[b * n / bins..(b + 1) * n / bins];
            let count = members.len();
            ReliabilityBin {
                p_lo: p[members[0]],
                p_hi: p[members[count - 1]],
                p_mean: members.iter().map(|&i| p[i]).sum::<f64>() / count as f64,
                error_rate: members.iter().filter(|&&i| wrong[i]).count() as f64 / count as f64,
                count,
            }
        })
        .collect()
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
            curve_fractions: vec![0.5, 1.0],
            isotonic_prior: 5.0,
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
        assert!(e.sweep[0].select.is_some_and(|s| s.base_rate > 0.0) && e.sweep_chosen == Some(0));
        // A_j > 0 on the two spikes and the five noise features (each is a row's maximum on
        // the hard images' weak spikes too); the curve's 1.0 point is the shipped probe.
        let active = e.compression.active.as_ref().unwrap();
        assert_eq!(active.accuracy_random.len(), 3);
        assert_eq!(e.compression.curve.iter().map(|c| c.subset.kept).collect::<Vec<_>>(), vec![4, 8]);
        assert_eq!(e.compression.curve[1].subset.accuracy, e.compression.accuracy_all);
        assert!(e.compression.curve[1].subset.accuracy_random.is_empty());
        assert_eq!(e.reliability.iter().map(|b| b.count).sum::<usize>(), 60);
        assert_eq!(e.reliability.len(), 10);
        assert_eq!(cal.reference.q_score.percentiles.len(), 101);
        // The served assessment agrees with the measured one for every test row.
        let test_rows: Vec<usize> = rows(&parts, Part::Test);
        let mask = cal.discriminative_set(8).unwrap();
        // tau sits strictly between two plateaus of select p: no select image is on it.
        let select_p: Vec<f32> = rows(&parts, Part::Select)
            .iter()
            .map(|&i| {
                cal.assess(h.row(i), &qscore::score(h.row(i), cal.epsilon, &mask).unwrap(), None)
                    .unwrap()
                    .p_misclassified
            })
            .collect();
        assert!(select_p.iter().all(|&p| p != cal.threshold), "{} in {select_p:?}", cal.threshold);
        assert!(select_p.iter().any(|&p| p < cal.threshold) && select_p.iter().any(|&p| p > cal.threshold));
        let flagged = test_rows
            .iter()
            .filter(|&&i| {
                let s = qscore::score(h.row(i), cal.epsilon, &mask).unwrap();
                cal.assess(h.row(i), &s, None).unwrap().likely_misclassified
            })
            .count();
        assert!((flagged as f64 / 60.0 - e.flag.operating.flagged_rate).abs() < 1e-9);
        assert_eq!(cal.probe.predict(h.row(0)).class, 0);
        // The report prints every new figure.
        let md = super::super::report::markdown(&[&cal]);
        for table in ["only the features with A_j > 0", "Compression curve", "| select AUPRC |", "Reliability of"] {
            assert!(md.contains(table), "{table} missing from\n{md}");
        }
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
            curve_fractions: vec![1.0],
            isotonic_prior: 5.0,
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

    /// p = [0.9, 0.1, 0.5, 0.3, 0.7] (wrong: 1, 0, 0, 1, 1) in 2 bins: sorted 0.1, 0.3 | 0.5,
    /// 0.7, 0.9 (cuts at 5 * 1 / 2 = 2). Bin 1: mean 0.2, one of two wrong; bin 2: mean 0.7,
    /// two of three wrong. More bins than images gives one bin per image.
    #[test]
    fn reliability_by_hand() {
        let p = [0.9, 0.1, 0.5, 0.3, 0.7];
        let wrong = [true, false, false, true, true];
        let bins = reliability(&p, &wrong, 2);
        assert_eq!(bins.len(), 2);
        let (a, b) = (bins[0], bins[1]);
        assert_eq!((a.p_lo, a.p_hi, a.count), (0.1, 0.3, 2));
        assert!((a.p_mean - 0.2).abs() < 1e-12 && (a.error_rate - 0.5).abs() < 1e-12);
        assert_eq!((b.p_lo, b.p_hi, b.count), (0.5, 0.9, 3));
        assert!((b.p_mean - 0.7).abs() < 1e-12 && (b.error_rate - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(reliability(&p, &wrong, 10).len(), 5);
        assert!(reliability(&[], &[], 10).is_empty());
    }

    /// A = [5, 0, 30, 5, 12]: descending, ties by index: 2 (30), 4 (12), 0 (5), 3 (5), 1 (0).
    #[test]
    fn features_rank_by_descending_frequency() {
        assert_eq!(ranked_by_frequency(&[5.0, 0.0, 30.0, 5.0, 12.0]), vec![2, 4, 0, 3, 1]);
        let (mean, sd) = mean_sd(&[0.8, 0.82, 0.84]);
        assert!((mean - 0.82).abs() < 1e-12 && (sd - 0.02).abs() < 1e-12);
        assert_eq!(mean_sd(&[0.5]), (0.5, 0.0));
    }

    /// Rows with select AUPRC [0.2, 0.3, 0.3, None]: the first 0.3 (row 1) is chosen, whatever
    /// the test figures say.
    #[test]
    fn sweep_row_is_chosen_on_select() {
        let row = |select: Option<f64>, test: f64| SweepRow {
            epsilon: 1.0,
            percentiles: (50.0, 95.0),
            discriminative: 1,
            zero_share: 0.0,
            misclassified: Ranking { auroc: None, auprc: Some(test), base_rate: 0.1 },
            select: Some(Ranking { auroc: None, auprc: select, base_rate: 0.1 }),
        };
        let rows = [row(Some(0.2), 0.9), row(Some(0.3), 0.1), row(Some(0.3), 0.5), row(None, 0.99)];
        assert_eq!(best_select_row(&rows), Some(1));
        assert_eq!(best_select_row(&[]), None);
    }

    /// Select p on plateaus 0.05, 0.2, 0.6: a chosen 0.6 moves to 0.4, a chosen 0.2 to 0.125,
    /// each flagging the same select images; the lowest plateau has nothing below and stays.
    #[test]
    fn tau_is_midway_to_the_next_plateau() {
        let p = [0.05, 0.2, 0.6, 0.6, 0.2, 0.05];
        assert!((between_plateaus(&p, 0.6) - 0.4).abs() < 1e-7);
        assert!((between_plateaus(&p, 0.2) - 0.125).abs() < 1e-7);
        assert_eq!(between_plateaus(&p, 0.05), 0.05);
    }
}
