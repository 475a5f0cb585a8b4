//! The nearest-neighbour risk estimators: how many of an image's k nearest labelled neighbours
//! disagree with the probe's prediction (`knn`), and how far away they are (`knn_distance`).
//!
//! A prediction that its own neighbourhood contradicts is likely wrong, whatever the probe's
//! confidence; an image far from every reference lies where the probe saw little data (the
//! label-free k-NN distance of Sun et al., "Out-of-Distribution Detection with Deep Nearest
//! Neighbors", ICML 2022, here unnormalised and averaged over the k). Neighbours are found by Euclidean distance between standardised representations
//! (the probe's standardisation), by brute force: calibration sets hold thousands of
//! references, which costs well under a millisecond per image on one core.
//!
//! The reference set is stored in calibration.json as half-precision floats (base64, little
//! endian) to keep the file small; calibration rounds the references the same way before it
//! measures the estimator, so served and measured values agree.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What one search over the references finds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Search {
    /// Share of the k nearest references whose label disagrees with the prediction, in [0, 1].
    pub disagreement: f32,
    /// Mean Euclidean distance to the k nearest references, >= 0.
    pub mean_distance: f32,
}

/// A labelled reference set, standardised, with its k.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Neighbours {
    /// How many neighbours vote.
    pub k: usize,
    /// Size of each reference.
    pub dim: usize,
    /// Class index of each reference.
    pub labels: Vec<u16>,
    /// The references, row after row (labels.len() x dim), rounded to half precision.
    #[serde(serialize_with = "to_f16_base64", deserialize_with = "from_f16_base64")]
    pub features: Vec<f32>,
}

impl Neighbours {
    /// Builds the set from standardised rows (n x dim, row-major) and their class indices.
    pub fn new(k: usize, dim: usize, rows: &[f32], labels: &[usize]) -> Self {
        assert_eq!(rows.len(), labels.len() * dim, "one label per row");
        let features = rows.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        Self { k: k.clamp(1, labels.len().max(1)), dim, labels: labels.iter().map(|&l| l as u16).collect(), features }
    }

    /// Share of the k nearest references whose label is not `predicted`. Equal distances are
    /// broken by reference order, so the answer is deterministic.
    pub fn disagreement(&self, query: &[f32], predicted: usize) -> f32 {
        self.search(query, predicted).disagreement
    }

    /// One search over the references for a standardised `query` (dim values): the share of the
    /// k nearest whose label is not `predicted`, and their mean Euclidean distance (in
    /// standard deviations of the fit part, as the features are). Equal distances are broken by
    /// reference order, so the answer is deterministic.
    pub fn search(&self, query: &[f32], predicted: usize) -> Search {
        assert_eq!(query.len(), self.dim, "query of the reference size");
        let mut dist: Vec<(f32, u32)> = self
            .features
            .chunks_exact(self.dim)
            .enumerate()
            .map(|(i, r)| (r.iter().zip(query).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(), i as u32))
            .collect();
        let k = self.k.min(dist.len());
        if k == 0 {
            return Search { disagreement: 0.0, mean_distance: 0.0 };
        }
        let by_distance = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        dist.select_nth_unstable_by(k - 1, by_distance);
        let nearest = &dist[..k];
        let against = nearest.iter().filter(|&&(_, i)| usize::from(self.labels[i as usize]) != predicted).count();
        let total: f64 = nearest.iter().map(|&(d2, _)| f64::from(d2).sqrt()).sum();
        Search { disagreement: against as f32 / k as f32, mean_distance: (total / k as f64) as f32 }
    }

    /// Checks a set read from a file.
    pub fn validate(&self, dim: usize, classes: usize) -> Result<(), String> {
        if self.dim != dim || self.features.len() != self.labels.len() * dim {
            return Err(format!("neighbours must hold {} rows of the model's {dim} features", self.labels.len()));
        }
        if self.labels.iter().any(|&l| usize::from(l) >= classes) {
            return Err("neighbours.labels holds a class past the probe's classes".into());
        }
        if self.k == 0 || self.k > self.labels.len() {
            return Err(format!("neighbours.k must lie in 1..={}", self.labels.len()));
        }
        Ok(())
    }
}

/// Serialises f32 values as little-endian half-precision floats in standard base64: the file
/// form of every stored set of representations (the neighbour set, the drift reference).
pub(crate) fn to_f16_base64<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
    let bytes: Vec<u8> = v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Reads what [`to_f16_base64`] wrote; `field` names the field in the error of an odd length.
pub(crate) fn from_f16_base64_named<'de, D: Deserializer<'de>>(d: D, field: &str) -> Result<Vec<f32>, D::Error> {
    let text = String::deserialize(d)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)?;
    if bytes.len() % 2 != 0 {
        return Err(serde::de::Error::custom(format!("{field} holds an odd number of bytes")));
    }
    Ok(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
}

fn from_f16_base64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    from_f16_base64_named(d, "neighbours.features")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// References on a line at 0, 1, 2, 10, 11 with labels 0, 0, 1, 1, 1 and k = 3.
    /// Query 0.4: nearest 0, 1, 2 -> labels 0, 0, 1; predicted 0 -> 1/3 disagree, predicted 1
    /// -> 2/3. Query 10.2: nearest 10, 11, 2 -> all label 1.
    #[test]
    fn counts_disagreeing_neighbours() {
        let n = Neighbours::new(3, 1, &[0.0, 1.0, 2.0, 10.0, 11.0], &[0, 0, 1, 1, 1]);
        n.validate(1, 2).unwrap();
        assert!((n.disagreement(&[0.4], 0) - 1.0 / 3.0).abs() < 1e-6);
        assert!((n.disagreement(&[0.4], 1) - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(n.disagreement(&[10.2], 1), 0.0);
        assert_eq!(n.disagreement(&[10.2], 0), 1.0);
    }

    /// The same line: from 0.4 the three nearest lie at 0.4, 0.6 and 1.6, mean 2.6 / 3; from
    /// 10.2 at 0.2, 0.8 and 8.2, mean 9.2 / 3. Both answers come from one search.
    #[test]
    fn mean_distance_to_the_nearest() {
        let n = Neighbours::new(3, 1, &[0.0, 1.0, 2.0, 10.0, 11.0], &[0, 0, 1, 1, 1]);
        let s = n.search(&[0.4], 0);
        assert!((s.mean_distance - 2.6 / 3.0).abs() < 1e-6 && (s.disagreement - 1.0 / 3.0).abs() < 1e-6);
        assert!((n.search(&[10.2], 1).mean_distance - 9.2 / 3.0).abs() < 1e-5);
    }

    /// The file form round-trips exactly, because the set is rounded to f16 when built.
    #[test]
    fn round_trips_through_json() {
        let n = Neighbours::new(2, 2, &[0.1, -1.3, 2.7, 1e-3], &[1, 0]);
        assert_eq!(n.features[0], half::f16::from_f32(0.1).to_f32());
        let back: Neighbours = serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
        assert_eq!(back, n);
        assert!(n.validate(3, 2).is_err() && n.validate(2, 1).is_err());
    }
}
