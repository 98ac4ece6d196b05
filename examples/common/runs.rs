//! What the example pipelines share: recognising a run directory made with the same config,
//! the warm-up-then-cosine schedule, atomic writes and the line charts of their curves.
//!
//! Each example's `main.rs` and the root test harness declare it once as the crate's `runs`
//! module (`#[path = "../common/runs.rs"]`), and the pipelines use `super::runs`; not every
//! example uses every item.
#![allow(dead_code)]

use std::path::Path;

use burn::optim::AdamConfig;
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn_distill::train::{DistillConfig, ObjectiveConfig, OptimizerConfig, RunStatus, RunSummary};

type Error = Box<dyn std::error::Error>;

/// What a run directory already holds, against the config a phase would run with.
pub struct SavedRun {
    /// It holds a `config.json`.
    pub has_config: bool,
    /// That config is the wanted one.
    pub same_config: bool,
    /// Its `summary.json`, when it has one that reads.
    pub summary: Option<RunSummary>,
}

impl SavedRun {
    /// Reads `dir`'s `config.json` and `summary.json`. Both configs go through `DistillConfig`
    /// and text before they are compared: f32 fields (Adam's betas) compare equal, and a
    /// `config.json` from before a field was added reads with that field's default.
    ///
    /// # Errors
    /// When `config` does not serialize.
    pub fn read(dir: &Path, config: &DistillConfig) -> Result<Self, Error> {
        let normalised = |config: &DistillConfig| -> Option<serde_json::Value> {
            serde_json::from_str(&serde_json::to_string(config).ok()?).ok()
        };
        let wanted = normalised(config).ok_or("the config does not serialize")?;
        let saved = std::fs::read_to_string(dir.join("config.json")).ok();
        let same_config = saved
            .as_deref()
            .and_then(|text| serde_json::from_str::<DistillConfig>(text).ok())
            .and_then(|saved| normalised(&saved))
            == Some(wanted);
        let summary = std::fs::read_to_string(dir.join("summary.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok());
        Ok(Self {
            has_config: saved.is_some(),
            same_config,
            summary,
        })
    }

    /// The summary of a finished run (not stopped, its `final.bpk` written) with the wanted
    /// config.
    pub fn finished(&self, dir: &Path) -> Option<&RunSummary> {
        self.summary.as_ref().filter(|summary| {
            self.same_config && dir.join("final.bpk").is_file() && summary.status != RunStatus::Stopped
        })
    }
}

/// Adam with a linear warm-up over the first 5 % of `epochs × ⌈examples / batch_size⌉` steps
/// (from a hundredth of `peak`), then a cosine decay to a tenth of `peak`.
pub fn adam_warm_up_cosine(
    epochs: usize,
    examples: usize,
    batch_size: usize,
    peak: f64,
    objective: ObjectiveConfig,
) -> DistillConfig {
    let steps = epochs * examples.div_ceil(batch_size);
    let warm_up = (steps / 20).max(1);
    let schedule = LrSchedulerConfig::Sequential(SequentialLrSchedulerConfig::new(
        vec![
            LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(peak / 100.0, peak, warm_up)),
            LrSchedulerConfig::Cosine(
                CosineAnnealingLrSchedulerConfig::new(peak, steps.saturating_sub(warm_up) + 1).with_min_lr(peak / 10.0),
            ),
        ],
        vec![warm_up],
    ));
    DistillConfig::new(epochs, OptimizerConfig::Adam(AdamConfig::new()), schedule, objective)
        .with_batch_size(batch_size)
}

/// Writes `bytes` to `path` through a temporary file: a kill leaves the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    burn_distill::model::files::write_atomically(path, |file| file.write_all(bytes))?;
    Ok(())
}

/// A line chart: one line per series, with a legend.
pub struct Chart<'a> {
    /// The title.
    pub caption: &'a str,
    /// The x axis's label.
    pub x: &'a str,
    /// The y axis's label.
    pub y: &'a str,
    /// Each series' name and points; non-finite points are left out.
    pub lines: Vec<(String, Vec<(f64, f64)>)>,
    /// A horizontal reference line (a name and its y), drawn in black.
    pub reference: Option<(String, f64)>,
    /// The y range is the points' `[min × (1 − margin), max × (1 + margin)]`.
    pub margin: f64,
}

impl Chart<'_> {
    /// Draws the chart as a 1000 × 650 PNG at `path` (atomically).
    pub fn save(self, path: &Path) -> Result<(), Error> {
        use plotters::prelude::*;
        static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
        // Registering twice (a second run in one process) is harmless.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
        let lines: Vec<(String, Vec<(f64, f64)>)> = self
            .lines
            .into_iter()
            .map(|(name, points)| {
                (
                    name,
                    points
                        .into_iter()
                        .filter(|p| p.0.is_finite() && p.1.is_finite())
                        .collect(),
                )
            })
            .collect();
        let ys = || {
            lines
                .iter()
                .flat_map(|(_, points)| points.iter().map(|p| p.1))
                .chain(self.reference.as_ref().map(|r| r.1))
        };
        let max_x = lines
            .iter()
            .flat_map(|(_, points)| points.iter().map(|p| p.0))
            .fold(1.0, f64::max);
        let max_y = ys().fold(1e-3, f64::max);
        let min_y = ys().fold(max_y, f64::min);
        let (caption, x, y, reference, margin) = (self.caption, self.x, self.y, self.reference, self.margin);
        burn_distill::model::files::save_atomically(
            path,
            |temporary| -> Result<(), Error> {
                let root = BitMapBackend::new(temporary, (1000, 650)).into_drawing_area();
                root.fill(&WHITE)?;
                let mut chart = ChartBuilder::on(&root)
                    .caption(caption, ("sans-serif", 24))
                    .margin(15)
                    .x_label_area_size(45)
                    .y_label_area_size(60)
                    .build_cartesian_2d(0.0..max_x, (min_y * (1.0 - margin))..(max_y * (1.0 + margin)))?;
                chart.configure_mesh().x_desc(x).y_desc(y).draw()?;
                if let Some((name, value)) = reference {
                    chart
                        .draw_series(LineSeries::new(
                            vec![(0.0, value), (max_x, value)],
                            BLACK.stroke_width(1),
                        ))?
                        .label(name)
                        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
                }
                for (index, (name, points)) in lines.into_iter().enumerate() {
                    let color = Palette99::pick(index).to_rgba();
                    chart
                        .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                        .label(name)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()?;
                root.present()?;
                Ok(())
            },
            |error| error.into(),
        )
    }
}

/// Says `message` on stderr as a warning (even when the run is quiet) and appends it, with the
/// time in seconds since the Unix epoch, to `RUN_DIR/warnings.log`, the run's log of what went
/// differently than asked (a damaged cache rebuilt, say). A log that cannot be written is said
/// too, and does not stop the run.
pub fn warn(run_dir: &Path, message: &str) {
    use std::io::Write;
    eprintln!("warning: {message}");
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let path = run_dir.join("warnings.log");
    let written = std::fs::create_dir_all(run_dir).and_then(|()| {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        writeln!(file, "{seconds} {message}")
    });
    if let Err(error) = written {
        eprintln!("warning: could not write {}: {error}", path.display());
    }
}
