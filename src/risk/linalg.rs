//! The little dense linear algebra the risk model needs: Cholesky factors of symmetric
//! positive-definite matrices, triangular solves and inverses.
//!
//! Matrices are small (the Gaussian's d <= 1280, the stacked regression's ~12 weights), so plain
//! row-major `f64` slices and textbook loops are enough; no BLAS, no new dependency. Pure maths.

/// The lower Cholesky factor L of a symmetric positive-definite n x n matrix `a` (row-major),
/// so that a = L L^T; the upper triangle of the result is zero. `None` when a pivot is not
/// positive and finite (the matrix is not positive-definite, or holds a NaN).
pub fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    assert_eq!(a.len(), n * n, "an n x n matrix");
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            let v = a[i * n + j] - dot;
            if i == j {
                if !(v > 0.0 && v.is_finite()) {
                    return None;
                }
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = v / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// Solves a x = b given a's lower Cholesky factor `l` (n x n): forward then back substitution.
pub fn cholesky_solve(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
    assert_eq!(b.len(), n, "one right-hand side value per row");
    let mut y = vec![0.0; n];
    for i in 0..n {
        let dot: f64 = (0..i).map(|k| l[i * n + k] * y[k]).sum();
        y[i] = (b[i] - dot) / l[i * n + i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let dot: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k]).sum();
        x[i] = (y[i] - dot) / l[i * n + i];
    }
    x
}

/// The inverse of a lower-triangular n x n matrix with a non-zero diagonal, itself lower
/// triangular, by forward substitution on each column of the identity.
pub fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let mut inv = vec![0.0; n * n];
    for c in 0..n {
        inv[c * n + c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let dot: f64 = (c..i).map(|k| l[i * n + k] * inv[k * n + c]).sum();
            inv[i * n + c] = -dot / l[i * n + i];
        }
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    /// a = [[4, 2], [2, 3]]: L = [[2, 0], [1, sqrt 2]]; a x = (2, 1) gives x = (0.5, 0);
    /// L^-1 = [[1/2, 0], [-1/(2 sqrt 2), 1/sqrt 2]].
    #[test]
    fn factors_solves_and_inverts_by_hand() {
        let a = [4.0, 2.0, 2.0, 3.0];
        let l = cholesky(&a, 2).unwrap();
        let s2 = 2f64.sqrt();
        for (got, want) in l.iter().zip([2.0, 0.0, 1.0, s2]) {
            assert!((got - want).abs() < 1e-12, "{l:?}");
        }
        let x = cholesky_solve(&l, 2, &[2.0, 1.0]);
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1].abs() < 1e-12, "{x:?}");
        let inv = lower_inverse(&l, 2);
        for (got, want) in inv.iter().zip([0.5, 0.0, -1.0 / (2.0 * s2), 1.0 / s2]) {
            assert!((got - want).abs() < 1e-12, "{inv:?}");
        }
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_none(), "indefinite");
    }
}
