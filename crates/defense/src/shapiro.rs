//! The Shapiro–Wilk test of normality, as `scipy.stats.shapiro` computes it.
//!
//! This is Royston's algorithm AS R94 (Applied Statistics 44, 1995; the approximation of
//! Royston 1992), in double precision, with the same auxiliary algorithms scipy uses so that
//! W agrees with scipy to about 1e-15 rather than only to the approximation's accuracy:
//!
//! - the coefficients come from the normal order statistics' approximation
//!   `m_i = Φ⁻¹((i − 3/8) / (n + 1/4))` computed with AS 111 (`PPND`, Beasley and Springer
//!   1977, about 7 correct digits), corrected for the two outermost coefficients by Royston's
//!   polynomials in `1/√n`;
//! - W is the squared correlation between the sorted sample and the coefficients, computed as
//!   `1 − W` to keep precision for W near 1;
//! - the p-value is exact for n = 3, from Royston's log-normal approximation of `1 − W`
//!   otherwise (a transformed form for n ≤ 11), with the normal upper tail of AS 66 (Hill
//!   1973).
//!
//! Royston validated the p-value for 3 ≤ n ≤ 5000; W itself stays accurate beyond (scipy says
//! the same). PRADA uses only W.

use crate::Error;

/// The result of a Shapiro–Wilk test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapiroWilk {
    /// The statistic W in (0, 1]; small values speak against normality.
    pub w: f64,
    /// The p-value of W under normality (approximate for n > 5000).
    pub p_value: f64,
}

/// Tests `sample` for normality. The order of the values does not matter.
///
/// Errors: [`Error::TooFewSamples`] below 3 values, [`Error::NonFiniteInput`] for a NaN or an
/// infinity, [`Error::ZeroRange`] when all values are equal (scipy warns and returns W = 1).
///
/// ```
/// let w = capsule_defense::shapiro_wilk(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])?.w;
/// assert!((w - 0.9701646111).abs() < 1e-9); // scipy.stats.shapiro(range(1, 11))
/// # Ok::<(), capsule_defense::Error>(())
/// ```
pub fn shapiro_wilk(sample: &[f64]) -> Result<ShapiroWilk, Error> {
    let mut sorted = sample.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    shapiro_wilk_sorted(&sorted)
}

/// [`shapiro_wilk`] for a sample already sorted in increasing order, without copying it.
///
/// The values must be in increasing order; an unsorted sample gives a meaningless W (no
/// panic). Errors as [`shapiro_wilk`].
pub fn shapiro_wilk_sorted(x: &[f64]) -> Result<ShapiroWilk, Error> {
    let n = x.len();
    if x.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFiniteInput);
    }
    if n < 3 {
        return Err(Error::TooFewSamples { n });
    }
    // W does not change under a shift; centring on the middle value (the median for odd n)
    // keeps `x / range` small when the data sit far from zero, as scipy does.
    let centre = x[n / 2];
    let range = (x[n - 1] - centre) - (x[0] - centre);
    if range < SMALL {
        return Err(Error::ZeroRange);
    }
    let a = coefficients(n);
    let an = n as f64;

    // The coefficient of the i-th order statistic: −a[i] in the lower half, +a[n−1−i] in the
    // upper half, 0 for the middle of an odd sample.
    let coef = |i: usize| {
        let j = n - 1 - i;
        match i.cmp(&j) {
            std::cmp::Ordering::Less => -a[i],
            std::cmp::Ordering::Greater => a[j],
            std::cmp::Ordering::Equal => 0.0,
        }
    };

    let mut sa = 0.0;
    let mut sx = 0.0;
    for (i, &xi) in x.iter().enumerate() {
        sa += coef(i);
        sx += (xi - centre) / range;
    }
    sa /= an;
    sx /= an;

    let (mut ssa, mut ssx, mut sax) = (0.0, 0.0, 0.0);
    for (i, &xi) in x.iter().enumerate() {
        let asa = coef(i) - sa;
        let xsx = (xi - centre) / range - sx;
        ssa += asa * asa;
        ssx += xsx * xsx;
        sax += asa * xsx;
    }
    // 1 − W, computed so that it keeps its precision when W is close to 1.
    let ssassx = (ssa * ssx).sqrt();
    let w1 = (ssassx - sax) * (ssassx + sax) / (ssa * ssx);
    let w = 1.0 - w1;

    if n == 3 {
        // Exact: W ≥ 3/4 in theory; rounding may land just below.
        if w < 0.75 {
            return Ok(ShapiroWilk {
                w: 0.75,
                p_value: 0.0,
            });
        }
        let p_value = 1.0 - (6.0 / std::f64::consts::PI) * w.sqrt().acos();
        return Ok(ShapiroWilk { w, p_value });
    }

    let mut y = w1.ln();
    let (m, s);
    if n <= 11 {
        let gamma = poly(&G, an);
        if y >= gamma {
            return Ok(ShapiroWilk { w, p_value: SMALL });
        }
        y = -(gamma - y).ln();
        m = poly(&C3, an);
        s = poly(&C4, an).exp();
    } else {
        let ln_n = an.ln();
        m = poly(&C5, ln_n);
        s = poly(&C6, ln_n).exp();
    }
    Ok(ShapiroWilk {
        w,
        p_value: normal_upper_tail((y - m) / s),
    })
}

/// Below this range the sample is treated as constant (AS R94's `SMALL`).
const SMALL: f64 = 1e-19;

// Royston's polynomial coefficients (AS R94), lowest order first.
const C1: [f64; 6] = [0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056];
const C2: [f64; 6] = [0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633];
const C3: [f64; 4] = [0.5440, -0.39978, 0.025054, -6.714e-4];
const C4: [f64; 4] = [1.3822, -0.77857, 0.062767, -0.0020322];
const C5: [f64; 4] = [-1.5861, -0.31082, -0.083751, 0.0038915];
const C6: [f64; 3] = [-0.4803, -0.082676, 0.0030302];
const G: [f64; 2] = [-2.273, 0.459];

/// The AS R94 coefficients `a[0..n/2]` (positive, decreasing) for a sample of size `n ≥ 3`.
fn coefficients(n: usize) -> Vec<f64> {
    let half = n / 2;
    if n == 3 {
        return vec![std::f64::consts::FRAC_1_SQRT_2];
    }
    let an = n as f64;
    let an25 = an + 0.25;
    // Approximate expected normal order statistics of the lower half (negative).
    let mut a: Vec<f64> = (0..half)
        .map(|i| normal_quantile((i as f64 + 1.0 - 0.375) / an25))
        .collect();
    let summ2 = 2.0 * a.iter().map(|m| m * m).sum::<f64>();
    let ssumm2 = summ2.sqrt();
    let rsn = 1.0 / an.sqrt();
    let a1 = poly(&C1, rsn) - a[0] / ssumm2;
    let (first_plain, fac) = if n > 5 {
        let a2 = -a[1] / ssumm2 + poly(&C2, rsn);
        let fac = ((summ2 - 2.0 * a[0] * a[0] - 2.0 * a[1] * a[1])
            / (1.0 - 2.0 * a1 * a1 - 2.0 * a2 * a2))
            .sqrt();
        a[1] = a2;
        (2, fac)
    } else {
        let fac = ((summ2 - 2.0 * a[0] * a[0]) / (1.0 - 2.0 * a1 * a1)).sqrt();
        (1, fac)
    };
    a[0] = a1;
    let scale = -1.0 / fac;
    for v in &mut a[first_plain..] {
        *v *= scale;
    }
    a
}

/// `c[0] + c[1] x + c[2] x² + …`, evaluated in AS 181.2's order.
fn poly(c: &[f64], x: f64) -> f64 {
    let nord = c.len();
    if nord == 1 {
        return c[0];
    }
    let mut p = x * c[nord - 1];
    for &ci in c[1..nord - 1].iter().rev() {
        p = (p + ci) * x;
    }
    c[0] + p
}

/// The standard normal quantile Φ⁻¹(p), algorithm AS 111 (`PPND`); about 7 correct digits,
/// which is what Royston's approximation was fitted with. Returns 0 outside (0, 1).
fn normal_quantile(p: f64) -> f64 {
    const SPLIT: f64 = 0.42;
    const A: [f64; 4] = [
        2.50662823884,
        -18.61500062529,
        41.39119773534,
        -25.44106049637,
    ];
    const B: [f64; 4] = [
        -8.47351093090,
        23.08336743743,
        -21.06224101826,
        3.13082909833,
    ];
    const C: [f64; 4] = [-2.78718931138, -2.29796479134, 4.85014127135, 2.32121276858];
    const D: [f64; 2] = [3.54388924762, 1.63706781897];
    let q = p - 0.5;
    if q.abs() <= SPLIT {
        let r = q * q;
        let num = q * (((A[3] * r + A[2]) * r + A[1]) * r + A[0]);
        let den = (((B[3] * r + B[2]) * r + B[1]) * r + B[0]) * r + 1.0;
        return num / den;
    }
    let r = if q > 0.0 { 1.0 - p } else { p };
    if r.is_nan() || r <= 0.0 {
        return 0.0;
    }
    let r = (-r.ln()).sqrt();
    let v = (((C[3] * r + C[2]) * r + C[1]) * r + C[0]) / ((D[1] * r + D[0]) * r + 1.0);
    if q < 0.0 { -v } else { v }
}

/// The standard normal upper tail `P(Z > z)`, algorithm AS 66 (Hill 1973) with the later
/// extended upper limit of 38 standard deviations.
fn normal_upper_tail(z: f64) -> f64 {
    const LTONE: f64 = 7.0;
    const UTZERO: f64 = 38.0;
    const CON: f64 = 1.28;
    let (mut upper, mut z) = (true, z);
    if z.is_nan() || z <= 0.0 {
        upper = false;
        z = -z;
    }
    if !(z <= LTONE || (upper && z <= UTZERO)) {
        return if upper { 0.0 } else { 1.0 };
    }
    let y = 0.5 * z * z;
    let tail = if z <= CON {
        0.5 - z
            * (0.398942280444
                - 0.399903438504 * y
                    / (y + 5.75885480458
                        - 29.8213557808
                            / (y + 2.62433121679 + 48.6959930692 / (y + 5.92885724438))))
    } else {
        0.398942280385 * (-y).exp()
            / (z - 3.8052e-8
                + 1.00000615302
                    / (z + 3.98064794e-4
                        + 1.98615381364
                            / (z - 0.151679116635
                                + 5.29330324926
                                    / (z + 4.8385912808
                                        - 15.1508972451
                                            / (z + 0.742380924027
                                                + 30.789933034 / (z + 3.99019417011))))))
    };
    if upper { tail } else { 1.0 - tail }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    // algorithms.md §1.6 and §8: scipy 1.17.1's values.
    #[test]
    fn published_vectors_match_scipy() {
        let v1 = [
            488.0, 486.0, 492.0, 490.0, 489.0, 491.0, 488.0, 490.0, 496.0, 487.0, 487.0, 493.0,
        ];
        let r = shapiro_wilk(&v1).unwrap();
        assert!(close(r.w, 0.9444861206, 1e-9), "{r:?}");
        assert!(close(r.p_value, 0.5582696906, 1e-9), "{r:?}");

        let v2: Vec<f64> = (1..=10).map(f64::from).collect();
        let r = shapiro_wilk(&v2).unwrap();
        assert!(close(r.w, 0.9701646111, 1e-9), "{r:?}");
        assert!(close(r.p_value, 0.8923673062, 1e-9), "{r:?}");

        let v3: Vec<f64> = (1..=100).map(f64::from).collect();
        let r = shapiro_wilk(&v3).unwrap();
        assert!(close(r.w, 0.9547247450, 1e-9), "{r:?}");
        assert!(close(r.p_value, 0.0017217222, 1e-9), "{r:?}");
    }

    #[test]
    fn order_and_shift_do_not_matter() {
        let v = [3.1, -2.0, 7.5, 0.25, 1.0, 9.0, -4.5, 2.2];
        let a = shapiro_wilk(&v).unwrap();
        let mut rev = v;
        rev.reverse();
        let shifted: Vec<f64> = v.iter().map(|x| x + 1e6).collect();
        assert_eq!(shapiro_wilk(&rev).unwrap(), a);
        assert!(close(shapiro_wilk(&shifted).unwrap().w, a.w, 1e-9));
    }

    #[test]
    fn rejects_degenerate_samples() {
        assert_eq!(
            shapiro_wilk(&[1.0, 2.0]),
            Err(Error::TooFewSamples { n: 2 })
        );
        assert_eq!(shapiro_wilk(&[4.0; 20]), Err(Error::ZeroRange));
        assert_eq!(
            shapiro_wilk(&[1.0, f64::NAN, 2.0]),
            Err(Error::NonFiniteInput)
        );
    }

    #[test]
    fn n3_is_exact_and_in_range() {
        // Equally spaced: W = 1, p = 1.
        let r = shapiro_wilk(&[1.0, 2.0, 3.0]).unwrap();
        assert!(
            close(r.w, 1.0, 1e-12) && close(r.p_value, 1.0, 1e-6),
            "{r:?}"
        );
        // Two equal and one far value: W at its minimum 3/4, p = 0.
        let r = shapiro_wilk(&[0.0, 0.0, 1.0]).unwrap();
        assert!(close(r.w, 0.75, 1e-12) && r.p_value < 1e-6, "{r:?}");
    }

    #[test]
    fn quantile_and_tail_are_inverse() {
        // AS 111 is good to about 1e-7 in z near the centre; Shapiro-Wilk needs p >= 1 / (8 n).
        for p in [1e-4, 0.001, 0.02, 0.3, 0.5, 0.77, 0.999] {
            let z = normal_quantile(p);
            let back = 1.0 - normal_upper_tail(z);
            assert!(close(back, p, 1e-5 * p), "{p} -> {z} -> {back}");
        }
    }
}
