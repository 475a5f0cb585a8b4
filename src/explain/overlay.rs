//! A heatmap drawn over the input it explains, as a PNG: what `Accept: image/png` and
//! `qscore explain --out` answer.
//!
//! The input is shown as the model saw it (resized, cropped, de-normalised), in grey so the
//! colours belong to the heatmap alone: red to yellow where occluding lowers the feature, blue
//! where it raises it, both scaled to the panel's largest |value| and blended in proportion to
//! it, so a cell that does not matter shows the image unchanged. The hottest cell is outlined
//! in green. Several features are panels side by side, in the order they were asked for. A
//! small input is enlarged by whole pixels (nearest neighbour) to at least 224 pixels, so a
//! 28x28 cell stays a visible square.

use image::{Rgb, RgbImage};
use ndarray::ArrayView3;

use super::{Occlusion, hottest};

/// Pixels between panels.
const GAP: u32 = 4;
/// The side an enlarged panel reaches at least.
const MIN_SIDE: usize = 224;
/// Strongest blend of the heatmap's colour over the image.
const MAX_ALPHA: f32 = 0.7;

/// How many times a side of the input is enlarged in a panel.
pub fn scale(plan: &Occlusion) -> usize {
    (MIN_SIDE / plan.height.max(plan.width)).max(1)
}

/// Bytes of the RGB canvas for `panels` panels (what a caller reserves before drawing).
pub fn canvas_bytes(plan: &Occlusion, panels: usize) -> u64 {
    let k = scale(plan) as u64;
    let (w, h) = (plan.width as u64 * k, plan.height as u64 * k);
    (panels.max(1) as u64 * (w + u64::from(GAP))) * h * 3
}

/// Draws one panel per heatmap over `input` (C, H, W), normalised with `mean` and `std` per
/// channel; `heatmaps` are [`Occlusion::heatmaps`] grids of `plan`.
pub fn render(input: ArrayView3<f32>, mean: &[f32], std: &[f32], plan: &Occlusion, heatmaps: &[&[f32]]) -> RgbImage {
    let k = scale(plan);
    let (pw, ph) = ((plan.width * k) as u32, (plan.height * k) as u32);
    // No feature to map (an image on which no discriminative feature fired): the input alone.
    let none: [&[f32]; 1] = [&[]];
    let heatmaps = if heatmaps.is_empty() { &none[..] } else { heatmaps };
    let panels = heatmaps.len() as u32;
    let mut canvas = RgbImage::from_pixel(panels * (pw + GAP) - GAP, ph, Rgb([255, 255, 255]));
    let (_, cols) = plan.grid();
    let channels = input.dim().0;
    // The image as the model saw it, in grey: (x * std + mean) per channel, averaged.
    let grey = |y: usize, x: usize| {
        let sum: f32 = (0..channels).map(|c| input[[c, y, x]] * std[c] + mean[c]).sum();
        (sum / channels as f32).clamp(0.0, 1.0)
    };
    for (i, map) in heatmaps.iter().enumerate() {
        let left = i as u32 * (pw + GAP);
        let peak = map.iter().fold(0.0_f32, |m, v| if v.is_finite() { m.max(v.abs()) } else { m });
        for y in 0..plan.height {
            for x in 0..plan.width {
                let v = if peak > 0.0 { map[(y / plan.stride) * cols + x / plan.stride] / peak } else { 0.0 };
                let base = grey(y, x) * 255.0;
                let (colour, alpha) =
                    if v >= 0.0 { (hot(v), MAX_ALPHA * v) } else { ([40.0, 90.0, 255.0], -MAX_ALPHA * v) };
                let px = Rgb(colour.map(|c| (base * (1.0 - alpha) + c * alpha).round().clamp(0.0, 255.0) as u8));
                for dy in 0..k {
                    for dx in 0..k {
                        canvas.put_pixel(left + (x * k + dx) as u32, (y * k + dy) as u32, px);
                    }
                }
            }
        }
        if let Some((cell, value)) = hottest(map)
            && value > 0.0
        {
            let (y, x, h, w) = plan.cell_rect(cell / cols, cell % cols);
            outline(&mut canvas, left + (x * k) as u32, (y * k) as u32, (w * k) as u32, (h * k) as u32);
        }
    }
    canvas
}

/// The "hot" ramp: dark red at 0, red, then yellow at 1.
fn hot(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    [255.0 * (0.5 + v).min(1.0), 255.0 * (2.0 * v - 1.0).max(0.0), 0.0]
}

/// A one-pixel green rectangle.
fn outline(canvas: &mut RgbImage, x: u32, y: u32, w: u32, h: u32) {
    let green = Rgb([0, 230, 0]);
    let (x1, y1) = ((x + w).min(canvas.width()) - 1, (y + h).min(canvas.height()) - 1);
    for xx in x..=x1 {
        canvas.put_pixel(xx, y, green);
        canvas.put_pixel(xx, y1, green);
    }
    for yy in y..=y1 {
        canvas.put_pixel(x, yy, green);
        canvas.put_pixel(x1, yy, green);
    }
}

/// The canvas as PNG bytes.
pub fn png(canvas: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let mut out = std::io::Cursor::new(Vec::new());
    canvas.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use ndarray::Array3;

    use super::*;
    use crate::explain::ExplainLimits;

    #[test]
    fn panels_are_enlarged_side_by_side_and_the_hottest_cell_is_outlined() {
        let plan = Occlusion::plan(28, 28, None, None, &ExplainLimits::DEFAULT).unwrap();
        let input = Array3::<f32>::zeros((1, 28, 28));
        let (rows, cols) = plan.grid();
        let mut map = vec![0.0_f32; rows * cols];
        map[3 * cols + 5] = 2.0;
        let canvas = render(input.view(), &[0.5], &[0.25], &plan, &[&map, &map]);
        assert_eq!((canvas.width(), canvas.height()), (2 * 224 + GAP, 224));
        assert_eq!(canvas_bytes(&plan, 2), u64::from(canvas.width() + GAP) * 224 * 3);
        // The hottest cell's top-left corner is outlined; a cold cell shows the grey image.
        assert_eq!(canvas.get_pixel(5 * 2 * 8, 3 * 2 * 8), &Rgb([0, 230, 0]));
        assert_eq!(canvas.get_pixel(0, 0), &Rgb([128, 128, 128]));
        assert!(png(&canvas).unwrap().starts_with(b"\x89PNG"));
        // No feature: one panel of the input alone.
        let alone = render(input.view(), &[0.5], &[0.25], &plan, &[]);
        assert_eq!((alone.width(), alone.height()), (224, 224));
        assert_eq!(alone.get_pixel(100, 100), &Rgb([128, 128, 128]));
    }
}
