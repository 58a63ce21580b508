//! Tile scores painted over the slide's overview, with a colour bar that states its range.

use super::read::Rgb;

/// Where the tiles are and one score per tile.
#[derive(Debug)]
pub struct Layer<'a> {
    /// Level-0 size of the slide.
    pub width: u32,
    pub height: u32,
    pub tile_size_level0: f64,
    pub xs: &'a [i32],
    pub ys: &'a [i32],
    pub values: Vec<f32>,
}

/// The range the colours span.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    pub min: f32,
    pub max: f32,
}

const LEGEND: u32 = 34;
/// Viridis, sampled at five stops: readable by colour-blind people and in grey.
const STOPS: [[f32; 3]; 5] = [
    [68.0, 1.0, 84.0],
    [59.0, 82.0, 139.0],
    [33.0, 145.0, 140.0],
    [94.0, 201.0, 98.0],
    [253.0, 231.0, 37.0],
];

/// Paints each tile (55 % opaque) over `overview` and adds a colour bar with the range below it.
pub fn render(overview: &Rgb, layer: &Layer<'_>) -> (Rgb, Scale) {
    let finite = layer.values.iter().copied().filter(|v| v.is_finite());
    let min = finite.clone().fold(f32::INFINITY, f32::min);
    let max = finite.fold(f32::NEG_INFINITY, f32::max);
    let scale = if min.is_finite() {
        Scale { min, max }
    } else {
        Scale { min: 0.0, max: 0.0 }
    };
    let (w, h) = (overview.width, overview.height);
    let mut out = Rgb {
        width: w,
        height: h + LEGEND,
        pixels: vec![255; (w * (h + LEGEND) * 3) as usize],
    };
    out.pixels[..overview.pixels.len()].copy_from_slice(&overview.pixels);
    let sx = f64::from(w) / f64::from(layer.width.max(1));
    let sy = f64::from(h) / f64::from(layer.height.max(1));
    for ((&x, &y), &v) in layer.xs.iter().zip(layer.ys).zip(&layer.values) {
        if !v.is_finite() {
            continue;
        }
        let colour = colour(scale, v);
        let x0 = (f64::from(x) * sx).floor().max(0.0) as u32;
        let y0 = (f64::from(y) * sy).floor().max(0.0) as u32;
        let x1 = ((f64::from(x) + layer.tile_size_level0) * sx)
            .ceil()
            .min(f64::from(w)) as u32;
        let y1 = ((f64::from(y) + layer.tile_size_level0) * sy)
            .ceil()
            .min(f64::from(h)) as u32;
        for py in y0..y1 {
            for px in x0..x1 {
                let p = &mut out.pixels[((py * w + px) * 3) as usize..][..3];
                for c in 0..3 {
                    p[c] = (f32::from(p[c]) * 0.45 + colour[c] * 0.55).round() as u8;
                }
            }
        }
    }
    legend(&mut out, h, scale);
    (out, scale)
}

fn colour(scale: Scale, v: f32) -> [f32; 3] {
    let t = if scale.max > scale.min {
        ((v - scale.min) / (scale.max - scale.min)).clamp(0.0, 1.0)
    } else {
        0.5
    };
    let at = t * (STOPS.len() - 1) as f32;
    let i = (at.floor() as usize).min(STOPS.len() - 2);
    let f = at - i as f32;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    [
        a[0] + (b[0] - a[0]) * f,
        a[1] + (b[1] - a[1]) * f,
        a[2] + (b[2] - a[2]) * f,
    ]
}

/// A colour bar from min (left) to max (right), with both values written beside it.
fn legend(out: &mut Rgb, top: u32, scale: Scale) {
    let w = out.width;
    let (min_text, max_text) = (format!("{:.3}", scale.min), format!("{:.3}", scale.max));
    let margin = 4 + text_width(&min_text) + 6;
    let right = 4 + text_width(&max_text) + 6;
    let bar = w.saturating_sub(margin + right);
    for y in top + 8..top + LEGEND - 8 {
        for x in 0..bar {
            let v = scale.min + (scale.max - scale.min) * x as f32 / bar.max(1) as f32;
            let c = colour(scale, v);
            let p = &mut out.pixels[((y * w + margin + x) * 3) as usize..][..3];
            p.copy_from_slice(&[c[0] as u8, c[1] as u8, c[2] as u8]);
        }
    }
    write(out, 4, top + 12, &min_text);
    write(out, margin + bar + 6, top + 12, &max_text);
}

/// Digits, '.' and '-' in a 3 x 5 bitmap, drawn at twice that size.
const GLYPHS: [(char, [u8; 5]); 12] = [
    ('0', [7, 5, 5, 5, 7]),
    ('1', [2, 6, 2, 2, 7]),
    ('2', [7, 1, 7, 4, 7]),
    ('3', [7, 1, 7, 1, 7]),
    ('4', [5, 5, 7, 1, 1]),
    ('5', [7, 4, 7, 1, 7]),
    ('6', [7, 4, 7, 5, 7]),
    ('7', [7, 1, 1, 1, 1]),
    ('8', [7, 5, 7, 5, 7]),
    ('9', [7, 5, 7, 1, 7]),
    ('.', [0, 0, 0, 0, 2]),
    ('-', [0, 0, 7, 0, 0]),
];

fn text_width(text: &str) -> u32 {
    text.chars().count() as u32 * 8
}

fn write(out: &mut Rgb, x: u32, y: u32, text: &str) {
    for (k, ch) in text.chars().enumerate() {
        let Some((_, rows)) = GLYPHS.iter().find(|(c, _)| *c == ch) else {
            continue;
        };
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) == 0 {
                    continue;
                }
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let px = x + k as u32 * 8 + col * 2 + dx;
                    let py = y + r as u32 * 2 + dy;
                    if px < out.width && py < out.height {
                        let p = &mut out.pixels[((py * out.width + px) * 3) as usize..][..3];
                        p.copy_from_slice(&[0, 0, 0]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_are_painted_with_the_scale_and_a_legend_is_added() {
        let overview = Rgb {
            width: 100,
            height: 50,
            pixels: vec![255; 100 * 50 * 3],
        };
        let layer = Layer {
            width: 1000,
            height: 500,
            tile_size_level0: 100.0,
            xs: &[0, 900],
            ys: &[0, 400],
            values: vec![0.2, 0.8],
        };
        let (out, scale) = render(&overview, &layer);
        assert_eq!((out.width, out.height), (100, 50 + LEGEND));
        assert_eq!(scale, Scale { min: 0.2, max: 0.8 });
        let at = |x: u32, y: u32| out.pixels[((y * 100 + x) * 3) as usize..][..3].to_vec();
        // Low score: dark purple over white; high score: yellow over white; untouched: white.
        assert!(at(5, 5)[2] > at(5, 5)[1]);
        assert!(at(95, 45)[0] > 200 && at(95, 45)[2] < 150);
        assert_eq!(at(50, 25), vec![255, 255, 255]);
    }
}
