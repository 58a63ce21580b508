//! Stain normalisation (Macenko et al., "A method for normalizing histology slides for
//! quantitative analysis", ISBI 2009): each slide's own haematoxylin and eosin colours are
//! estimated once, from its tissue, and every tile is re-rendered with a reference slide's stains,
//! so that a model sees the colours it was trained on whichever lab stained and scanner scanned
//! the slide.
//!
//! Optical density `OD = -ln((I + 1) / 240)` per channel (240: the usual background intensity of
//! the method's reference implementation, in whose units the reference stains are given). The
//! stain plane is spanned by the two main eigenvectors of the tissue's OD; the stain vectors are
//! the directions at the `alpha` and `100 - alpha` percentiles of angle in it; concentrations are
//! the least-squares solution against them, scaled so that their 99th percentiles match the
//! reference's.

use nalgebra::{Matrix2x3, Matrix3, Matrix3x2, SymmetricEigen, Vector2, Vector3};
use serde::{Deserialize, Serialize};

const BACKGROUND: f64 = 240.0;
/// Samples whose OD, summed over the channels, is below this are background or nearly so. (The
/// method's reference implementation drops samples below it in any one channel, which drops
/// nearly pure eosin, whose red OD is small, and bends the eosin estimate.)
const BETA: f64 = 0.15;
/// Angle percentile of the extreme stain directions.
const ALPHA: f64 = 1.0;

/// The reference of the method's widely used implementation: H and E optical-density vectors and
/// the 99th-percentile concentrations of its reference slide.
pub const REFERENCE_STAINS: [[f64; 3]; 2] = [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]];
pub const REFERENCE_MAX: [f64; 2] = [1.9705, 1.0308];

/// What a manifest says about stain normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StainSpec {
    /// `macenko` (the only method so far).
    pub method: String,
    /// The stains tiles are re-rendered with: haematoxylin, then eosin OD vectors (RGB).
    #[serde(default = "reference_stains")]
    pub target_stains: [[f64; 3]; 2],
    /// Their 99th-percentile concentrations.
    #[serde(default = "reference_max")]
    pub target_max: [f64; 2],
}

fn reference_stains() -> [[f64; 3]; 2] {
    REFERENCE_STAINS
}

fn reference_max() -> [f64; 2] {
    REFERENCE_MAX
}

/// One slide's estimated stains, and how its tiles are re-rendered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Estimate {
    pub method: String,
    /// The slide's haematoxylin and eosin OD vectors (unit length, RGB).
    pub slide_stains: [[f64; 3]; 2],
    /// The 99th percentiles of the slide's H and E concentrations.
    pub slide_max: [f64; 2],
    /// Tissue samples the estimate was made from.
    pub samples: usize,
}

fn od(value: f64) -> f64 {
    -((value + 1.0) / BACKGROUND).ln()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Estimates a slide's stains from RGB samples of its tissue (e.g. the tissue mask's cells).
pub fn estimate(samples: &[[f32; 3]]) -> Result<Estimate, String> {
    let ods: Vec<Vector3<f64>> = samples
        .iter()
        .map(|p| {
            Vector3::new(
                od(f64::from(p[0])),
                od(f64::from(p[1])),
                od(f64::from(p[2])),
            )
        })
        .filter(|v| v.sum() >= BETA && v.iter().all(|c| c.is_finite()))
        .collect();
    if ods.len() < 16 {
        return Err(format!(
            "too little stained tissue to estimate the stains ({} samples)",
            ods.len()
        ));
    }
    let n = ods.len() as f64;
    let mean = ods.iter().sum::<Vector3<f64>>() / n;
    let covariance = ods
        .iter()
        .map(|v| (v - mean) * (v - mean).transpose())
        .sum::<Matrix3<f64>>()
        / (n - 1.0);
    let eigen = SymmetricEigen::new(covariance);
    let mut order = [0_usize, 1, 2];
    order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
    let first = eigen.eigenvectors.column(order[0]).into_owned();
    let second = eigen.eigenvectors.column(order[1]).into_owned();
    // Eigenvectors have no sign: point both into positive OD.
    let first = if first.sum() < 0.0 { -first } else { first };
    let second = if second.sum() < 0.0 { -second } else { second };
    let mut angles: Vec<f64> = ods
        .iter()
        .map(|v| v.dot(&second).atan2(v.dot(&first)))
        .collect();
    angles.sort_by(f64::total_cmp);
    let direction = |phi: f64| {
        let v = first * phi.cos() + second * phi.sin();
        let v = if v.sum() < 0.0 { -v } else { v };
        v / v.norm()
    };
    let low = direction(percentile(&angles, ALPHA));
    let high = direction(percentile(&angles, 100.0 - ALPHA));
    // Haematoxylin absorbs more red than eosin does.
    let (h, e) = if low[0] > high[0] {
        (low, high)
    } else {
        (high, low)
    };
    let stains = Matrix3x2::from_columns(&[h, e]);
    let pinv = stains
        .pseudo_inverse(1e-9)
        .map_err(|e| format!("the stain vectors are degenerate: {e}"))?;
    let mut hs = Vec::with_capacity(ods.len());
    let mut es = Vec::with_capacity(ods.len());
    for v in &ods {
        let c = pinv * v;
        hs.push(c[0]);
        es.push(c[1]);
    }
    hs.sort_by(f64::total_cmp);
    es.sort_by(f64::total_cmp);
    let slide_max = [percentile(&hs, 99.0), percentile(&es, 99.0)];
    if slide_max.iter().any(|m| !m.is_finite() || *m <= 1e-6) {
        return Err("the slide's stain concentrations are degenerate".into());
    }
    Ok(Estimate {
        method: "macenko".into(),
        slide_stains: [[h[0], h[1], h[2]], [e[0], e[1], e[2]]],
        slide_max,
        samples: ods.len(),
    })
}

/// Re-renders RGB pixels from a slide's stains into the target's.
#[derive(Debug, Clone)]
pub struct Normaliser {
    /// Concentrations from OD, scaled to the target's range: 2 × 3.
    to_concentration: Matrix2x3<f32>,
    /// OD from concentrations, with the target stains: 3 × 2.
    to_od: Matrix3x2<f32>,
    od_of: [f32; 256],
}

impl Normaliser {
    pub fn new(estimate: &Estimate, target: &StainSpec) -> Result<Self, String> {
        let [h, e] = estimate.slide_stains;
        let slide = Matrix3x2::from_columns(&[Vector3::from(h), Vector3::from(e)]);
        let pinv = slide
            .pseudo_inverse(1e-9)
            .map_err(|e| format!("the slide's stain vectors are degenerate: {e}"))?;
        let scale = Vector2::new(
            target.target_max[0] / estimate.slide_max[0],
            target.target_max[1] / estimate.slide_max[1],
        );
        let to_concentration =
            Matrix2x3::from_rows(&[pinv.row(0) * scale[0], pinv.row(1) * scale[1]]);
        let [th, te] = target.target_stains;
        let to_od = Matrix3x2::from_columns(&[Vector3::from(th), Vector3::from(te)]);
        let mut od_of = [0.0_f32; 256];
        for (i, slot) in od_of.iter_mut().enumerate() {
            *slot = od(i as f64) as f32;
        }
        Ok(Self {
            to_concentration: to_concentration.cast(),
            to_od: to_od.cast(),
            od_of,
        })
    }

    /// Normalises interleaved RGB bytes in place.
    pub fn apply(&self, rgb: &mut [u8]) {
        for px in rgb.chunks_exact_mut(3) {
            let od = Vector3::new(
                self.od_of[usize::from(px[0])],
                self.od_of[usize::from(px[1])],
                self.od_of[usize::from(px[2])],
            );
            let c = (self.to_concentration * od).map(|v| v.max(0.0));
            let out = self.to_od * c;
            for (channel, value) in px.iter_mut().zip(out.iter()) {
                let intensity = BACKGROUND as f32 * (-value).exp() - 1.0;
                *channel = intensity.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Pixels rendered from stain vectors and concentrations (the forward model).
    fn render(stains: [[f64; 3]; 2], concentrations: &[(f64, f64)]) -> Vec<[f32; 3]> {
        concentrations
            .iter()
            .map(|&(h, e)| {
                let mut px = [0.0_f32; 3];
                for (c, slot) in px.iter_mut().enumerate() {
                    let od = stains[0][c] * h + stains[1][c] * e;
                    *slot = (BACKGROUND * (-od).exp() - 1.0).clamp(0.0, 255.0) as f32;
                }
                px
            })
            .collect()
    }

    fn unit(v: [f64; 3]) -> [f64; 3] {
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        [v[0] / n, v[1] / n, v[2] / n]
    }

    fn concentrations() -> Vec<(f64, f64)> {
        // A deterministic spread over pure and mixed stain densities.
        (0..40)
            .flat_map(|i| {
                (0..40).map(move |j| (0.05 + 0.035 * f64::from(i), 0.05 + 0.02 * f64::from(j)))
            })
            .chain((0..40).map(|i| (0.1 + 0.03 * f64::from(i), 0.0)))
            .chain((0..40).map(|j| (0.0, 0.1 + 0.02 * f64::from(j))))
            .collect()
    }

    #[test]
    fn macenko_recovers_the_stains_a_slide_was_rendered_with() {
        let stains = [unit([0.65, 0.70, 0.29]), unit([0.07, 0.99, 0.11])];
        let estimate = estimate(&render(stains, &concentrations())).unwrap();
        for (got, want) in estimate.slide_stains.iter().zip(&stains) {
            let cos: f64 = got.iter().zip(want).map(|(a, b)| a * b).sum();
            assert!(cos > 0.995, "{got:?} vs {want:?}: cos {cos}");
        }
    }

    #[test]
    fn normalising_re_renders_a_slide_with_the_target_stains() {
        let slide = [unit([0.65, 0.70, 0.29]), unit([0.07, 0.99, 0.11])];
        let target = StainSpec {
            method: "macenko".into(),
            target_stains: REFERENCE_STAINS,
            target_max: REFERENCE_MAX,
        };
        let amounts = concentrations();
        let estimate = estimate(&render(slide, &amounts)).unwrap();
        let normaliser = Normaliser::new(&estimate, &target).unwrap();
        // The same tissue as the reference lab would have stained it.
        let scale = [
            REFERENCE_MAX[0] / estimate.slide_max[0],
            REFERENCE_MAX[1] / estimate.slide_max[1],
        ];
        let expected = render(
            REFERENCE_STAINS,
            &amounts
                .iter()
                .map(|&(h, e)| (h * scale[0], e * scale[1]))
                .collect::<Vec<_>>(),
        );
        let mut pixels: Vec<u8> = render(slide, &amounts)
            .iter()
            .flat_map(|p| p.map(|v| v.round() as u8))
            .collect();
        normaliser.apply(&mut pixels);
        let mean_error = pixels
            .chunks(3)
            .zip(&expected)
            .map(|(got, want)| {
                got.iter()
                    .zip(want)
                    .map(|(g, w)| (f32::from(*g) - w).abs())
                    .sum::<f32>()
                    / 3.0
            })
            .sum::<f32>()
            / expected.len() as f32;
        assert!(mean_error < 3.0, "mean error {mean_error} grey levels");
    }

    #[test]
    fn a_slide_without_stained_tissue_is_not_estimated() {
        let white = vec![[250.0_f32, 250.0, 250.0]; 500];
        assert!(
            estimate(&white)
                .unwrap_err()
                .contains("too little stained tissue")
        );
    }
}
