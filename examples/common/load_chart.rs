//! The chart of `examples/load.rs`: requests/s and p99 per scenario, two
//! bar panels side by side, written as SVG with `plotters`.
#![allow(dead_code)]

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One bar group: the scenario's name, requests/s and p99 in milliseconds.
pub struct Bar {
    pub name: &'static str,
    pub requests_per_second: f64,
    /// Requests/s over the ceiling's.
    pub ratio: f64,
    pub p99_ms: f64,
}

/// Writes the chart to `path` (its directory must exist).
pub fn write_svg(path: &Path, bars: &[Bar], title: &str) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(550);
    panel(
        &left,
        bars,
        "requests/s (ratio to the ceiling)",
        |b| b.requests_per_second,
        |b| format!("{} ({:.2}x)", format_value(b.requests_per_second), b.ratio),
        &RGBColor(52, 101, 164),
    )?;
    panel(
        &right,
        bars,
        "p99 (ms)",
        |b| b.p99_ms,
        |b| format_value(b.p99_ms),
        &RGBColor(204, 102, 0),
    )?;
    root.present()?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    bars: &[Bar],
    caption: &str,
    value: impl Fn(&Bar) -> f64,
    label: impl Fn(&Bar) -> String,
    color: &RGBColor,
) -> Result<(), Box<dyn std::error::Error>> {
    let top = bars.iter().map(&value).fold(0.0, f64::max).max(1e-9) * 1.15;
    let n = bars.len() as u32;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0u32..n.saturating_sub(1)).into_segmented(), 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_style(("sans-serif", 11))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => bars
                .get(*i as usize)
                .map_or(String::new(), |b| b.name.to_string()),
            _ => String::new(),
        })
        .y_label_formatter(&|v| format_value(*v))
        .draw()?;
    chart.draw_series(bars.iter().zip(0u32..).map(|(b, i)| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), value(b)),
            ],
            color.filled(),
        );
        bar.set_margin(0, 0, 12, 12);
        bar
    }))?;
    let value_style = ("sans-serif", 12)
        .into_text_style(area)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(bars.iter().zip(0u32..).map(|(b, i)| {
        Text::new(
            label(b),
            (SegmentValue::CenterOf(i), value(b) + top * 0.01),
            value_style.clone(),
        )
    }))?;
    Ok(())
}

fn format_value(v: f64) -> String {
    if v == 0.0 {
        "0".to_string()
    } else if v >= 1000.0 {
        format!("{:.0}", v)
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
