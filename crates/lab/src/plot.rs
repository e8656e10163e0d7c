//! Line plots as PNG files: one or more panels side by side, each with axes, ticks, a title,
//! axis labels and a legend.
//!
//! Drawn pixel by pixel with the public-domain 8×8 bitmap font of `font8x8` and encoded by
//! `image`'s PNG encoder: no font files, no system libraries, and a few seconds of build
//! time instead of a plotting library's. ASCII text only.

use std::path::Path;

use crate::Error;

/// One line of a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points in data coordinates, drawn in order (NaN points break the line).
    pub points: Vec<(f64, f64)>,
    /// RGB colour.
    pub color: [u8; 3],
    /// Draw a small square at each point.
    pub markers: bool,
}

/// A horizontal reference line (a threshold or a floor).
#[derive(Debug, Clone, PartialEq)]
pub struct HLine {
    /// Its y value.
    pub y: f64,
    /// Legend text.
    pub label: String,
    /// RGB colour; drawn dashed.
    pub color: [u8; 3],
}

/// One set of axes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Panel {
    /// Title above the axes.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label above the y axis.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Dashed horizontal lines.
    pub hlines: Vec<HLine>,
    /// Fixed y range; `None` fits the data.
    pub y_range: Option<(f64, f64)>,
    /// Fixed x range; `None` fits the data.
    pub x_range: Option<(f64, f64)>,
}

/// A palette of distinguishable colours for series.
pub const COLORS: [[u8; 3]; 8] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
];

const PANEL_W: u32 = 560;
const PLOT_H: u32 = 330;
const MARGIN_L: u32 = 70;
const MARGIN_R: u32 = 20;
const MARGIN_T: u32 = 50;
const LEGEND_ROW: u32 = 14;

/// Renders `panels` side by side into a PNG at `path`.
///
/// Errors: [`Error::Plot`] when the file cannot be written.
pub fn render(panels: &[Panel], path: &Path) -> Result<(), Error> {
    let legend_rows = panels
        .iter()
        .map(|p| p.series.len() + p.hlines.len())
        .max()
        .unwrap_or(0) as u32;
    let height = MARGIN_T + PLOT_H + 50 + legend_rows * LEGEND_ROW + 10;
    let width = PANEL_W * panels.len().max(1) as u32;
    let mut canvas = Canvas::new(width, height);
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut canvas, panel, i as u32 * PANEL_W);
    }
    image::RgbImage::from_raw(width, height, canvas.pixels)
        .ok_or_else(|| Error::Plot {
            reason: "canvas size mismatch".into(),
        })?
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| Error::Plot {
            reason: format!("{}: {e}", path.display()),
        })
}

struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![255; (width * height * 3) as usize],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x < 0 || y < 0 || x >= i64::from(self.width) || y >= i64::from(self.height) {
            return;
        }
        let i = ((y as u32 * self.width + x as u32) * 3) as usize;
        self.pixels[i..i + 3].copy_from_slice(&c);
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }

    /// A line `thick` pixels wide (Bresenham with a square pen); `dash` > 0 skips pixels.
    fn line(&mut self, a: (f64, f64), b: (f64, f64), c: [u8; 3], thick: i64, dash: i64) {
        let (mut x0, mut y0) = (a.0.round() as i64, a.1.round() as i64);
        let (x1, y1) = (b.0.round() as i64, b.1.round() as i64);
        let dx = (x1 - x0).abs();
        let dy = -(y1 - y0).abs();
        let sx = if x0 < x1 { 1 } else { -1 };
        let sy = if y0 < y1 { 1 } else { -1 };
        let mut err = dx + dy;
        let mut step = 0i64;
        loop {
            if dash == 0 || (step / dash) % 2 == 0 {
                let h = thick / 2;
                self.rect(x0 - h, y0 - h, x0 - h + thick - 1, y0 - h + thick - 1, c);
            }
            step += 1;
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    /// ASCII text with its top-left corner at (x, y), each font pixel `scale` pixels.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3], scale: i64) {
        for (k, ch) in s.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY
                .get(ch as usize)
                .copied()
                .unwrap_or(font8x8::legacy::BASIC_LEGACY[usize::from(b'?')]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        let px = x + (k as i64 * 8 + col) * scale;
                        let py = y + row as i64 * scale;
                        self.rect(px, py, px + scale - 1, py + scale - 1, c);
                    }
                }
            }
        }
    }
}

fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 8 * scale
}

/// About five round tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last)
        .map(|i| {
            let t = i as f64 * step;
            if i == 0 {
                return 0.0;
            }
            // Round away binary noise (0.6000000000000001).
            let scale = 10f64.powi(12 - t.abs().max(1e-300).log10().ceil() as i32);
            (t * scale).round() / scale
        })
        .collect()
}

fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        let d = (-step.log10() - 1e-9).ceil().max(0.0);
        let scaled = step * 10f64.powf(d);
        d as usize + usize::from((scaled - scaled.round()).abs() > 1e-6)
    };
    format!("{v:.decimals$}")
}

fn data_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = 0.05 * (hi - lo);
    (lo - pad, hi + pad)
}

fn draw_panel(c: &mut Canvas, p: &Panel, x_off: u32) {
    const BLACK: [u8; 3] = [0, 0, 0];
    const GREY: [u8; 3] = [225, 225, 225];
    let (x0, x1) = (
        i64::from(x_off + MARGIN_L),
        i64::from(x_off + PANEL_W - MARGIN_R),
    );
    let (y0, y1) = (i64::from(MARGIN_T), i64::from(MARGIN_T + PLOT_H));
    let (xlo, xhi) = p
        .x_range
        .unwrap_or_else(|| data_range(p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0))));
    let (ylo, yhi) = p.y_range.unwrap_or_else(|| {
        data_range(
            p.series
                .iter()
                .flat_map(|s| s.points.iter().map(|q| q.1))
                .chain(p.hlines.iter().map(|h| h.y)),
        )
    });
    let sx = |x: f64| x0 as f64 + (x - xlo) / (xhi - xlo) * (x1 - x0) as f64;
    let sy = |y: f64| y1 as f64 - (y - ylo) / (yhi - ylo) * (y1 - y0) as f64;

    // Title, then the y label above the axis.
    let tw = text_width(&p.title, 2);
    c.text(
        i64::from(x_off) + (i64::from(PANEL_W) - tw) / 2,
        8,
        &p.title,
        BLACK,
        2,
    );
    c.text(x0 - 60, y0 - 16, &p.y_label, BLACK, 1);

    // Grid and ticks.
    let xt = ticks(xlo, xhi);
    let xstep = if xt.len() > 1 { xt[1] - xt[0] } else { 1.0 };
    for &t in &xt {
        let x = sx(t).round() as i64;
        c.line((x as f64, y0 as f64), (x as f64, y1 as f64), GREY, 1, 0);
        c.line(
            (x as f64, y1 as f64),
            (x as f64, (y1 + 5) as f64),
            BLACK,
            1,
            0,
        );
        let l = tick_label(t, xstep);
        c.text(x - text_width(&l, 1) / 2, y1 + 8, &l, BLACK, 1);
    }
    let yt = ticks(ylo, yhi);
    let ystep = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
    for &t in &yt {
        let y = sy(t).round() as i64;
        c.line((x0 as f64, y as f64), (x1 as f64, y as f64), GREY, 1, 0);
        c.line(
            ((x0 - 5) as f64, y as f64),
            (x0 as f64, y as f64),
            BLACK,
            1,
            0,
        );
        let l = tick_label(t, ystep);
        c.text(x0 - 8 - text_width(&l, 1), y - 4, &l, BLACK, 1);
    }
    // The axes box.
    for (a, b) in [
        ((x0, y0), (x1, y0)),
        ((x1, y0), (x1, y1)),
        ((x1, y1), (x0, y1)),
        ((x0, y1), (x0, y0)),
    ] {
        c.line(
            (a.0 as f64, a.1 as f64),
            (b.0 as f64, b.1 as f64),
            BLACK,
            1,
            0,
        );
    }
    let xl = text_width(&p.x_label, 1);
    c.text((x0 + x1 - xl) / 2, y1 + 24, &p.x_label, BLACK, 1);

    let inside = |x: f64, y: f64| {
        x >= (x0 - 1) as f64 && x <= (x1 + 1) as f64 && y >= (y0 - 1) as f64 && y <= (y1 + 1) as f64
    };
    for h in &p.hlines {
        let y = sy(h.y);
        if inside(x0 as f64, y) {
            c.line((x0 as f64, y), (x1 as f64, y), h.color, 2, 6);
        }
    }
    for s in &p.series {
        let pts: Vec<Option<(f64, f64)>> = s
            .points
            .iter()
            .map(|&(x, y)| {
                let q = (sx(x), sy(y));
                (x.is_finite() && y.is_finite() && inside(q.0, q.1)).then_some(q)
            })
            .collect();
        for w in pts.windows(2) {
            if let (Some(a), Some(b)) = (w[0], w[1]) {
                c.line(a, b, s.color, 2, 0);
            }
        }
        if s.markers {
            for q in pts.iter().flatten() {
                let (x, y) = (q.0.round() as i64, q.1.round() as i64);
                c.rect(x - 3, y - 3, x + 3, y + 3, s.color);
            }
        }
    }

    // Legend under the x label.
    let mut ly = y1 + 44;
    for s in &p.series {
        c.line(
            (x0 as f64, (ly + 4) as f64),
            ((x0 + 24) as f64, (ly + 4) as f64),
            s.color,
            2,
            0,
        );
        if s.markers {
            c.rect(x0 + 9, ly + 1, x0 + 15, ly + 7, s.color);
        }
        c.text(x0 + 32, ly, &s.label, BLACK, 1);
        ly += i64::from(LEGEND_ROW);
    }
    for h in &p.hlines {
        c.line(
            (x0 as f64, (ly + 4) as f64),
            ((x0 + 24) as f64, (ly + 4) as f64),
            h.color,
            2,
            6,
        );
        c.text(x0 + 32, ly, &h.label, BLACK, 1);
        ly += i64::from(LEGEND_ROW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(0.0, 1.0), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        let t = ticks(-0.05, 1.05);
        assert_eq!(t.first(), Some(&0.0));
        assert!(ticks(0.0, 3000.0).len() <= 7);
        assert_eq!(tick_label(0.25, 0.25), "0.25");
        assert_eq!(tick_label(0.4, 0.2), "0.4");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
    }

    #[test]
    fn renders_a_png() {
        let path =
            std::env::temp_dir().join(format!("capsule-lab-plot-{}.png", std::process::id()));
        let panel = Panel {
            title: "test".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series {
                label: "line".into(),
                points: vec![(0.0, 0.0), (1.0, 1.0), (2.0, f64::NAN), (3.0, 0.5)],
                color: COLORS[0],
                markers: true,
            }],
            hlines: vec![HLine {
                y: 0.6,
                label: "floor".into(),
                color: COLORS[1],
            }],
            ..Panel::default()
        };
        render(&[panel.clone(), panel], &path).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!(img.width(), 2 * PANEL_W);
        std::fs::remove_file(&path).unwrap();
    }
}
