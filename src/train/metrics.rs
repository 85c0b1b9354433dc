//! Machine-readable metrics (one JSON object per line) and the loss-curve PNG.

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

pub struct MetricsLog {
    file: File,
    tensorboard: Option<super::tensorboard::EventWriter>,
    /// The last `elapsed_s` of the lines kept, so a resumed run's clock goes on from it.
    pub elapsed_before: f64,
}

impl MetricsLog {
    /// Opens `path` for appending, first dropping lines past `keep_through_step`
    /// (so a resumed run continues the log as if never stopped).
    pub fn open(path: &Path, keep_through_step: Option<usize>) -> Result<Self> {
        let mut elapsed_before = 0.0f64;
        let kept: String = match keep_through_step {
            Some(step) if path.exists() => crate::fsutil::read_string(path)?
                .lines()
                .filter(|l| {
                    let v = serde_json::from_str::<Value>(l).unwrap_or_default();
                    let kept = v["step"].as_u64().is_some_and(|s| s as usize <= step);
                    if let (true, Some(t)) = (kept, v["elapsed_s"].as_f64()) {
                        elapsed_before = elapsed_before.max(t);
                    }
                    kept
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            _ => String::new(),
        };
        crate::fsutil::write_atomic(path, kept.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(MetricsLog {
            file,
            tensorboard: None,
            elapsed_before,
        })
    }

    /// Also writes every record's numbers as TensorBoard scalars into `dir`.
    pub fn with_tensorboard(mut self, dir: &Path) -> Result<Self> {
        self.tensorboard = Some(super::tensorboard::EventWriter::create(
            dir,
            super::status::unix_now(),
        )?);
        Ok(self)
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        writeln!(self.file, "{record}").context("writing metrics.jsonl")?;
        if let (Some(tb), Some(step)) = (self.tensorboard.as_mut(), record["step"].as_u64()) {
            let scalars: Vec<(String, f64)> = record
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| *k != "step")
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect();
            tb.scalars(step, super::status::unix_now(), &scalars)?;
        }
        Ok(())
    }
}

/// (step, value) points of one curve.
pub type Series = Vec<(f64, f64)>;

/// Reads the (step, loss) and (step, val_loss) series back from a metrics file.
pub fn read_series(path: &Path) -> Result<(Series, Series)> {
    let mut train = Vec::new();
    let mut val = Vec::new();
    for line in crate::fsutil::read_string(path)?.lines() {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{}: bad line", path.display()))?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["val_loss"].as_f64() {
            val.push((step, l));
        }
    }
    Ok((train, val))
}

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// A 900 × 560 PNG drawn by `draw`, written to a temporary file and renamed into place.
pub fn draw_png(
    path: &Path,
    draw: impl FnOnce(
        &plotters::drawing::DrawingArea<plotters::prelude::BitMapBackend, plotters::coord::Shift>,
    ) -> std::result::Result<(), Box<dyn std::error::Error>>,
) -> Result<()> {
    use plotters::prelude::*;
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let tmp = crate::fsutil::temp_sibling(path);
    {
        let root = BitMapBackend::new(&tmp, (900, 560)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow!("{}: cannot draw plot: {e}", path.display()))?;
        draw(&root)
            .and_then(|_| root.present().map_err(Into::into))
            .map_err(|e| anyhow!("{}: cannot draw plot: {e}", path.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

/// Draws train and validation loss against step into a PNG.
pub fn plot_losses(path: &Path, train: &[(f64, f64)], val: &[(f64, f64)]) -> Result<()> {
    use plotters::prelude::*;
    let all = train.iter().chain(val);
    let max_step = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = all
        .map(|p| p.1)
        .fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = if lo <= hi {
        (lo * 0.95, hi * 1.05)
    } else {
        (0.0, 1.0)
    };
    draw_png(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("loss", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_step, lo..hi)?;
        chart
            .configure_mesh()
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("step")
            .y_desc("cross-entropy (nats)")
            .draw()?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))?
            .label("val")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}
