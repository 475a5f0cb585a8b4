//! How well a score ranks the cases it should: AUROC, AUPRC and the choice of a flag threshold.
//!
//! Calibration measures every risk estimator with these, so they follow scikit-learn's
//! definitions exactly (`roc_auc_score`, `average_precision_score`, `precision_recall_curve`),
//! ties included: tied scores move together, as one threshold. Higher scores mean "more likely
//! positive". Pure functions, no I/O.

use serde::{Deserialize, Serialize};

/// Area under the ROC curve: the probability that a random positive outscores a random
/// negative, ties counting one half. `None` when either class is absent.
pub fn auroc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), positive.len(), "one label per score");
    let order = descending(scores);
    let (mut pos_above, mut pairs_won) = (0_u64, 0.0_f64);
    let (n_pos, n_neg) = counts(positive);
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    for group in tie_groups(&order, scores) {
        let pos = group.iter().filter(|&&i| positive[i]).count() as u64;
        let neg = group.len() as u64 - pos;
        // Each negative here loses to every positive above it, and ties with those beside it.
        pairs_won += neg as f64 * (pos_above as f64 + 0.5 * pos as f64);
        pos_above += pos;
    }
    Some(pairs_won / (n_pos as f64 * n_neg as f64))
}

/// Average precision (scikit-learn's AUPRC): sum over thresholds of (R_k - R_{k-1}) * P_k.
/// `None` when there is no positive.
pub fn auprc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let curve = precision_recall(scores, positive)?;
    let mut last_recall = 0.0;
    let mut ap = 0.0;
    for p in &curve {
        ap += (p.recall - last_recall) * p.precision;
        last_recall = p.recall;
    }
    Some(ap)
}

/// One point of the precision-recall curve: what flagging every score >= `threshold` gives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operating {
    /// Scores at or above it are flagged.
    pub threshold: f64,
    /// Share of flagged cases that are positive.
    pub precision: f64,
    /// Share of positives that are flagged.
    pub recall: f64,
    /// Share of all cases that are flagged.
    pub flagged_rate: f64,
}

impl Operating {
    /// Harmonic mean of precision and recall; 0 when both are 0.
    pub fn f1(&self) -> f64 {
        let s = self.precision + self.recall;
        if s > 0.0 { 2.0 * self.precision * self.recall / s } else { 0.0 }
    }
}

/// Every operating point, from the highest threshold down; `None` without a positive.
pub fn precision_recall(scores: &[f64], positive: &[bool]) -> Option<Vec<Operating>> {
    assert_eq!(scores.len(), positive.len(), "one label per score");
    let (n_pos, _) = counts(positive);
    if n_pos == 0 {
        return None;
    }
    let order = descending(scores);
    let (mut tp, mut flagged) = (0_u64, 0_u64);
    let mut curve = Vec::new();
    for group in tie_groups(&order, scores) {
        tp += group.iter().filter(|&&i| positive[i]).count() as u64;
        flagged += group.len() as u64;
        curve.push(Operating {
            threshold: scores[group[0]],
            precision: tp as f64 / flagged as f64,
            recall: tp as f64 / n_pos as f64,
            flagged_rate: flagged as f64 / scores.len() as f64,
        });
    }
    Some(curve)
}

/// The threshold with the highest F1 (the highest threshold among equals, so fewer flags).
pub fn max_f1(scores: &[f64], positive: &[bool]) -> Option<Operating> {
    let curve = precision_recall(scores, positive)?;
    curve.into_iter().fold(None, |best: Option<Operating>, p| match best {
        Some(b) if b.f1() >= p.f1() => Some(b),
        _ => Some(p),
    })
}

/// The lowest threshold (most recall) whose precision reaches `target`; `None` when none does.
pub fn at_precision(scores: &[f64], positive: &[bool], target: f64) -> Option<Operating> {
    precision_recall(scores, positive)?.into_iter().rev().find(|p| p.precision >= target)
}

/// What flagging every score >= `threshold` gives on a labelled set.
pub fn operating_at(scores: &[f64], positive: &[bool], threshold: f64) -> Operating {
    assert_eq!(scores.len(), positive.len(), "one label per score");
    let (n_pos, _) = counts(positive);
    let flagged: Vec<bool> = scores.iter().map(|&s| s >= threshold).collect();
    let n_flagged = flagged.iter().filter(|&&f| f).count();
    let tp = flagged.iter().zip(positive).filter(|&(&f, &p)| f && p).count();
    let ratio = |a: usize, b: usize| if b > 0 { a as f64 / b as f64 } else { 0.0 };
    Operating {
        threshold,
        precision: ratio(tp, n_flagged),
        recall: ratio(tp, n_pos as usize),
        flagged_rate: ratio(n_flagged, scores.len()),
    }
}

/// A threshold halfway between `chosen` (one of `scores`) and the largest score below it.
///
/// Flagging scores >= the answer flags exactly the cases `chosen` flags, but no observed score
/// sits on the line, so a new case scoring a hair under the chosen plateau (an isotonic map's
/// interpolation between two plateaus) is judged by which plateau it is nearer, not by which
/// side of an exact tie it fell. When no score is below `chosen`, `chosen` itself (everything is
/// flagged, and there is no gap to sit in).
pub fn midway_below(scores: &[f64], chosen: f64) -> f64 {
    let below = scores.iter().copied().filter(|&s| s < chosen).fold(f64::NEG_INFINITY, f64::max);
    if below.is_finite() { (chosen + below) / 2.0 } else { chosen }
}

fn counts(positive: &[bool]) -> (u64, u64) {
    let pos = positive.iter().filter(|&&p| p).count() as u64;
    (pos, positive.len() as u64 - pos)
}

/// Indices sorted by score, highest first; NaN sorts last.
fn descending(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

/// Runs of equal scores in `order`.
fn tie_groups<'a>(order: &'a [usize], scores: &'a [f64]) -> impl Iterator<Item = &'a [usize]> {
    order.chunk_by(move |&a, &b| scores[a] == scores[b])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// scikit-learn's documented example: y = [0, 0, 1, 1], s = [0.1, 0.4, 0.35, 0.8].
    /// Pairs (pos, neg): 0.35 beats 0.1, loses to 0.4; 0.8 beats both: AUROC 3/4.
    /// Thresholds 0.8 (P 1, R 1/2), 0.4 (P 1/2, R 1/2), 0.35 (P 2/3, R 1), 0.1 (P 1/2, R 1):
    /// AP = 1/2 * 1 + 0 * 1/2 + 1/2 * 2/3 + 0 = 0.8333.
    #[test]
    fn sklearn_example() {
        let s = [0.1, 0.4, 0.35, 0.8];
        let y = [false, false, true, true];
        assert!(close(auroc(&s, &y).unwrap(), 0.75));
        assert!(close(auprc(&s, &y).unwrap(), 0.5 + 1.0 / 3.0));
    }

    /// Ties: s = [0.5, 0.5, 0.2, 0.1], y = [1, 0, 1, 0]. Pairs: (0.5, 0.5) half, (0.5, 0.1) won,
    /// (0.2, 0.5) lost, (0.2, 0.1) won: AUROC 2.5 / 4. Thresholds 0.5 (P 1/2, R 1/2), 0.2
    /// (P 2/3, R 1), 0.1 (P 1/2, R 1): AP = 1/2 * 1/2 + 1/2 * 2/3 = 0.5833.
    #[test]
    fn ties_move_together() {
        let s = [0.5, 0.5, 0.2, 0.1];
        let y = [true, false, true, false];
        assert!(close(auroc(&s, &y).unwrap(), 0.625));
        assert!(close(auprc(&s, &y).unwrap(), 0.25 + 1.0 / 3.0));
        let curve = precision_recall(&s, &y).unwrap();
        assert_eq!(curve.len(), 3);
        assert!(close(curve[0].flagged_rate, 0.5));
    }

    /// A perfect ranking scores 1, a reversed one 0; a constant score is the base rate for AP
    /// and one half for AUROC; one class alone has no AUROC.
    #[test]
    fn extremes() {
        let y = [true, true, false, false, false];
        assert!(close(auroc(&[5.0, 4.0, 3.0, 2.0, 1.0], &y).unwrap(), 1.0));
        assert!(close(auroc(&[1.0, 2.0, 3.0, 4.0, 5.0], &y).unwrap(), 0.0));
        assert!(close(auprc(&[5.0, 4.0, 3.0, 2.0, 1.0], &y).unwrap(), 1.0));
        assert!(close(auprc(&[1.0; 5], &y).unwrap(), 0.4));
        assert!(close(auroc(&[1.0; 5], &y).unwrap(), 0.5));
        assert_eq!(auroc(&[1.0, 2.0], &[true, true]), None);
        assert_eq!(auprc(&[1.0, 2.0], &[false, false]), None);
    }

    /// s = [0.9, 0.8, 0.7, 0.6, 0.1], y = [1, 0, 1, 0, 0]. F1 at 0.9: P 1, R 1/2, F1 2/3; at
    /// 0.7: P 2/3, R 1, F1 0.8 (best); at 0.6: P 1/2, R 1, F1 2/3. Precision >= 0.9 first holds
    /// at 0.9 only; >= 0.6 holds down to 0.7.
    #[test]
    fn thresholds() {
        let s = [0.9, 0.8, 0.7, 0.6, 0.1];
        let y = [true, false, true, false, false];
        let best = max_f1(&s, &y).unwrap();
        assert!(close(best.threshold, 0.7) && close(best.f1(), 0.8), "{best:?}");
        assert!(close(at_precision(&s, &y, 0.9).unwrap().threshold, 0.9));
        assert!(close(at_precision(&s, &y, 0.6).unwrap().threshold, 0.7));
        assert!(at_precision(&[0.1, 0.2], &[true, false], 0.9).is_none());
        let op = operating_at(&s, &y, 0.75);
        assert!(close(op.precision, 0.5) && close(op.recall, 0.5) && close(op.flagged_rate, 0.4));
    }

    /// s = [0.9, 0.8, 0.7, 0.7, 0.6, 0.1]: max F1's plateau 0.7 is moved to (0.7 + 0.6) / 2 =
    /// 0.65, which flags the same four cases; at the lowest score there is no gap, so 0.1 stays.
    #[test]
    fn threshold_sits_between_plateaus() {
        let s = [0.9, 0.8, 0.7, 0.7, 0.6, 0.1];
        let y = [true, false, true, true, false, false];
        let chosen = max_f1(&s, &y).unwrap().threshold;
        assert!(close(chosen, 0.7));
        let tau = midway_below(&s, chosen);
        assert!(close(tau, 0.65));
        assert_eq!(operating_at(&s, &y, tau), Operating { threshold: tau, ..operating_at(&s, &y, chosen) });
        assert!(s.iter().all(|&v| v != tau));
        assert!(close(midway_below(&s, 0.1), 0.1));
    }
}
