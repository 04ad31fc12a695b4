//! PNG plots of query answers: a token x layer heatmap of a trait score and
//! a line plot of scores over a response, drawn with `plotters` into memory
//! and written atomically next to the requested path.
//!
//! Text uses DejaVu Sans embedded in the binary (`coordinator/assets`), so
//! rendering needs no system fonts or font libraries.
//!
//! Non-finite values are skipped, not rejected: a NaN or infinite heatmap
//! cell is drawn grey (and counted under the title) and is left out of the
//! colour scale; a non-finite line point leaves a gap in its line. Only
//! input with no finite value at all is an error.

use std::error::Error as StdError;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use plotters::backend::BitMapBackend;
use plotters::chart::ChartBuilder;
use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::drawing::{DrawingArea, IntoDrawingArea};
use plotters::element::{PathElement, Rectangle};
use plotters::series::{DashedLineSeries, LineSeries};
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{
    Color, FontDesc, FontStyle, FontTransform, IntoFont, RGBColor, TextStyle, WHITE, register_font,
};

/// A per-token x layer heatmap of one trait score.
#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    pub title: String,
    /// Tokens, top to bottom.
    pub row_labels: Vec<String>,
    /// Layers, left to right.
    pub col_labels: Vec<String>,
    /// Row-major, `row_labels.len() * col_labels.len()` values.
    pub values: Vec<f32>,
    /// What the colour encodes, written beside the colour bar.
    pub value_label: String,
}

/// Scores over a response: one line per series, optional vertical markers.
#[derive(Debug, Clone, PartialEq)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Tokens along the x axis; every series has one value per token.
    pub x_labels: Vec<String>,
    /// `(legend name, one value per token)`.
    pub series: Vec<(String, Vec<f32>)>,
    /// `(label, token index)`, e.g. the commitment point.
    pub markers: Vec<(String, usize)>,
}

/// Why a plot was not written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("nothing to plot: {what} is empty")]
    Empty { what: &'static str },
    #[error("shape mismatch: {what} has {actual} values, expected {expected}")]
    ShapeMismatch {
        what: String,
        expected: usize,
        actual: usize,
    },
    #[error("nothing to plot: every value in {what} is NaN or infinite")]
    NoFiniteValues { what: &'static str },
    #[error("marker \"{label}\" is at token {index} but the plot has {len} tokens")]
    MarkerOutOfRange {
        label: String,
        index: usize,
        len: usize,
    },
    #[error("plot path {} does not name a file", path.display())]
    InvalidPath { path: PathBuf },
    #[error("output directory {} does not exist: create it before plotting", dir.display())]
    MissingParentDir { dir: PathBuf },
    #[error("embedded plot font could not be loaded")]
    Font,
    #[error("failed to draw plot: {source}")]
    Draw {
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("failed to encode png {}: {source}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("failed to write png {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Renders `spec` as a heatmap and writes it to `path` as a PNG.
///
/// The directory of `path` must exist; the file appears whole or not at all.
/// Drawing and encoding take milliseconds of CPU: async callers should run
/// this on a blocking thread.
pub fn heatmap_png(path: &Path, spec: &Heatmap) -> Result<(), PlotError> {
    let target = OutputTarget::resolve(path)?;
    let (image, _grid) = render_heatmap(spec)?;
    target.write_png(&image)
}

/// Renders `spec` as a line plot and writes it to `path` as a PNG.
///
/// The directory of `path` must exist; the file appears whole or not at all.
/// Like [`heatmap_png`], this blocks.
pub fn line_png(path: &Path, spec: &LinePlot) -> Result<(), PlotError> {
    let target = OutputTarget::resolve(path)?;
    let image = render_line(spec)?;
    target.write_png(&image)
}

const FONT_FAMILY: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");

const TITLE_SIZE: f64 = 21.0;
const LABEL_SIZE: f64 = 15.0;
const TICK_SIZE: f64 = 14.0;
const MARGIN: i32 = 16;
const MAX_LABEL_CHARS: usize = 24;
const MAX_LABEL_WIDTH: i32 = 240;

const TEXT: RGBColor = RGBColor(30, 30, 30);
const AXIS: RGBColor = RGBColor(90, 90, 90);
const NON_FINITE_CELL: RGBColor = RGBColor(190, 190, 190);
/// RdBu (reversed) stops from -1 to +1: blue for negative, white at 0, red
/// for positive.
const DIVERGING: [(f64, RGBColor); 5] = [
    (-1.0, RGBColor(33, 102, 172)),
    (-0.5, RGBColor(146, 197, 222)),
    (0.0, RGBColor(255, 255, 255)),
    (0.5, RGBColor(244, 165, 130)),
    (1.0, RGBColor(178, 24, 43)),
];
/// Tableau 10, cycled over series.
const SERIES_COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// Markers are dark so they stand apart from the series colours.
const MARKER_COLOURS: [RGBColor; 3] = [
    RGBColor(0, 0, 0),
    RGBColor(120, 40, 120),
    RGBColor(20, 90, 90),
];
const MARKER_ROWS: usize = 4;
const LEGEND_SAMPLE: i32 = 22;

/// An RGB image drawn in memory.
struct Rendered {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Rendered {
    fn blank(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            rgb: vec![255; width as usize * height as usize * 3],
        }
    }
}

/// Where the heatmap cells lie, in pixels.
#[derive(Debug, Clone, Copy)]
struct CellGrid {
    left: i32,
    top: i32,
    width: i32,
    height: i32,
    rows: usize,
    cols: usize,
}

impl CellGrid {
    fn col_edge(&self, col: usize) -> i32 {
        self.left + (col as i64 * i64::from(self.width) / self.cols as i64) as i32
    }

    fn row_edge(&self, row: usize) -> i32 {
        self.top + (row as i64 * i64::from(self.height) / self.rows as i64) as i32
    }

    fn col_center(&self, col: usize) -> i32 {
        (self.col_edge(col) + self.col_edge(col + 1)) / 2
    }

    fn row_center(&self, row: usize) -> i32 {
        (self.row_edge(row) + self.row_edge(row + 1)) / 2
    }
}

fn render_heatmap(spec: &Heatmap) -> Result<(Rendered, CellGrid), PlotError> {
    let rows = spec.row_labels.len();
    let cols = spec.col_labels.len();
    if rows == 0 {
        return Err(PlotError::Empty { what: "row_labels" });
    }
    if cols == 0 {
        return Err(PlotError::Empty { what: "col_labels" });
    }
    let expected = rows.saturating_mul(cols);
    if spec.values.len() != expected {
        return Err(PlotError::ShapeMismatch {
            what: format!("values ({rows} rows x {cols} cols)"),
            expected,
            actual: spec.values.len(),
        });
    }
    let max_abs = spec
        .values
        .iter()
        .filter(|value| value.is_finite())
        .map(|value| f64::from(value.abs()))
        .reduce(f64::max)
        .ok_or(PlotError::NoFiniteValues { what: "values" })?;
    let scale = if max_abs > 0.0 { max_abs } else { 1.0 };
    let non_finite = spec.values.iter().filter(|v| !v.is_finite()).count();
    ensure_font()?;

    let title_font = font(TITLE_SIZE);
    let label_font = font(LABEL_SIZE);
    let tick_font = font(TICK_SIZE);
    let line_height = text_size(&label_font, "Ag")?.1;

    // Rows: about 18 px a token, the plot capped so huge prompts stay sane.
    let plot_height = (rows.min(1_000) as i32 * 18).clamp(108, 1600);
    let row_step = label_step(line_height + 3, f64::from(plot_height) / rows as f64);
    let row_texts: Vec<(usize, String)> = (0..rows)
        .step_by(row_step)
        .map(|row| (row, axis_label(row, &spec.row_labels[row], row_step > 1)))
        .collect();
    let row_label_width =
        max_text_width(&label_font, row_texts.iter().map(|(_, t)| t))?.min(MAX_LABEL_WIDTH);

    // Columns: about 30 px a layer.
    let plot_width = (cols.min(1_000) as i32 * 30).clamp(240, 1400);
    let col_texts: Vec<String> = spec.col_labels.iter().map(|l| display_token(l)).collect();
    let col_label_width = max_text_width(&tick_font, col_texts.iter())?;
    let col_step = label_step(col_label_width + 8, f64::from(plot_width) / cols as f64);

    let title_height = text_size(&title_font, "Ag")?.1;
    let note = (non_finite > 0).then(|| {
        format!("{non_finite} non-finite cell(s) drawn grey and left out of the colour scale")
    });
    let note_height = if note.is_some() { line_height + 6 } else { 0 };
    let tick_labels: Vec<(f64, String)> = [1.0, 0.5, 0.0, -0.5, -1.0]
        .into_iter()
        .map(|fraction| (fraction, format_value(fraction * scale, scale)))
        .collect();
    let tick_label_width = max_text_width(&tick_font, tick_labels.iter().map(|(_, t)| t))?;
    let value_label = printable(&spec.value_label);
    let value_label_height = if value_label.is_empty() {
        0
    } else {
        line_height + 10
    };

    let grid = CellGrid {
        left: MARGIN + row_label_width + 10,
        top: MARGIN + title_height + 14 + note_height,
        width: plot_width,
        height: plot_height,
        rows,
        cols,
    };
    let bar_left = grid.left + grid.width + 24;
    let bar_width = 18;
    let bar_height = grid.height.min(420);
    let width = bar_left + bar_width + 8 + tick_label_width + 6 + value_label_height + MARGIN;
    let height = grid.top + grid.height + 8 + line_height + 10 + line_height + MARGIN;
    let mut image = Rendered::blank(width as u32, height as u32);
    {
        let root = BitMapBackend::with_buffer(&mut image.rgb, (image.width, image.height))
            .into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let title_style = title_font
            .color(&TEXT)
            .pos(Pos::new(HPos::Center, VPos::Top));
        let title = fit_width(&title_font, &printable(&spec.title), width - 2 * MARGIN)?;
        draw_text(&root, &title, &title_style, (width / 2, MARGIN))?;
        if let Some(note) = &note {
            let note_style = tick_font
                .color(&AXIS)
                .pos(Pos::new(HPos::Center, VPos::Top));
            draw_text(
                &root,
                note,
                &note_style,
                (width / 2, MARGIN + title_height + 8),
            )?;
        }

        for row in 0..rows {
            let (y0, y1) = (grid.row_edge(row), grid.row_edge(row + 1));
            for col in 0..cols {
                let (x0, x1) = (grid.col_edge(col), grid.col_edge(col + 1));
                let value = spec.values[row * cols + col];
                let colour = if value.is_finite() {
                    diverging_colour(f64::from(value) / scale)
                } else {
                    NON_FINITE_CELL
                };
                // Fills are end-exclusive; keep every cell at least a pixel.
                let corner = (x1.max(x0 + 1), y1.max(y0 + 1));
                let cell = Rectangle::new([(x0, y0), corner], colour.filled());
                root.draw(&cell).map_err(draw_error)?;
            }
        }
        let frame = [
            (grid.left - 1, grid.top - 1),
            (grid.left + grid.width, grid.top + grid.height),
        ];
        root.draw(&Rectangle::new(frame, AXIS.stroke_width(1)))
            .map_err(draw_error)?;

        // Token labels, right-aligned against the left edge of the grid.
        let row_style = label_font
            .color(&TEXT)
            .pos(Pos::new(HPos::Right, VPos::Center));
        for (row, text) in &row_texts {
            let y = grid.row_center(*row);
            let text = fit_width(&label_font, text, MAX_LABEL_WIDTH)?;
            draw_text(&root, &text, &row_style, (grid.left - 8, y))?;
            if row_step > 1 {
                tick(&root, (grid.left - 5, y), (grid.left - 2, y))?;
            }
        }

        // Layer labels under the grid, then the axis title.
        let col_style = tick_font
            .color(&TEXT)
            .pos(Pos::new(HPos::Center, VPos::Top));
        let below = grid.top + grid.height;
        for col in (0..cols).step_by(col_step) {
            let x = grid.col_center(col);
            tick(&root, (x, below + 1), (x, below + 4))?;
            draw_text(&root, &col_texts[col], &col_style, (x, below + 7))?;
        }
        let axis_style = label_font
            .color(&TEXT)
            .pos(Pos::new(HPos::Center, VPos::Top));
        let axis_title_y = below + 8 + line_height + 8;
        draw_text(
            &root,
            "layer",
            &axis_style,
            (grid.left + grid.width / 2, axis_title_y),
        )?;

        // Colour bar: +scale at the top, -scale at the bottom.
        for offset in 0..bar_height {
            let fraction = 1.0 - 2.0 * (f64::from(offset) + 0.5) / f64::from(bar_height);
            let y = grid.top + offset;
            let strip = Rectangle::new(
                [(bar_left, y), (bar_left + bar_width, y + 1)],
                diverging_colour(fraction).filled(),
            );
            root.draw(&strip).map_err(draw_error)?;
        }
        let bar_frame = [
            (bar_left - 1, grid.top - 1),
            (bar_left + bar_width, grid.top + bar_height),
        ];
        root.draw(&Rectangle::new(bar_frame, AXIS.stroke_width(1)))
            .map_err(draw_error)?;
        let bar_tick_style = tick_font
            .color(&TEXT)
            .pos(Pos::new(HPos::Left, VPos::Center));
        for (fraction, text) in &tick_labels {
            let y = grid.top + ((1.0 - fraction) / 2.0 * f64::from(bar_height - 1)).round() as i32;
            let right = bar_left + bar_width;
            tick(&root, (right, y), (right + 4, y))?;
            draw_text(&root, text, &bar_tick_style, (right + 7, y))?;
        }
        if !value_label.is_empty() {
            let rotated = label_font
                .color(&TEXT)
                .transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Center, VPos::Top));
            let x = bar_left + bar_width + 8 + tick_label_width + 8;
            // Centred on the bar, as long as the image is tall around it.
            let centre = grid.top + bar_height / 2;
            let room = 2 * (centre - MARGIN).min(height - MARGIN - centre);
            let value_label = fit_width(&label_font, &value_label, room)?;
            draw_text(&root, &value_label, &rotated, (x, centre))?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok((image, grid))
}

fn render_line(spec: &LinePlot) -> Result<Rendered, PlotError> {
    let tokens = spec.x_labels.len();
    if tokens == 0 {
        return Err(PlotError::Empty { what: "x_labels" });
    }
    if spec.series.is_empty() {
        return Err(PlotError::Empty { what: "series" });
    }
    for (name, values) in &spec.series {
        if values.len() != tokens {
            return Err(PlotError::ShapeMismatch {
                what: format!("series \"{name}\""),
                expected: tokens,
                actual: values.len(),
            });
        }
    }
    if let Some((label, index)) = spec.markers.iter().find(|(_, index)| *index >= tokens) {
        return Err(PlotError::MarkerOutOfRange {
            label: label.clone(),
            index: *index,
            len: tokens,
        });
    }
    let finite = spec
        .series
        .iter()
        .flat_map(|(_, values)| values.iter())
        .filter(|value| value.is_finite())
        .map(|value| f64::from(*value));
    let (low, high) = finite
        .fold(None, |range: Option<(f64, f64)>, value| match range {
            None => Some((value, value)),
            Some((low, high)) => Some((low.min(value), high.max(value))),
        })
        .ok_or(PlotError::NoFiniteValues { what: "series" })?;
    let (y_low, mut y_high) = padded_range(low, high);
    // Headroom for the marker labels, which stack in up to four rows.
    let marker_rows = spec.markers.len().min(MARKER_ROWS);
    y_high += (y_high - y_low) * 0.07 * marker_rows as f64;
    ensure_font()?;

    let title_font = font(TITLE_SIZE);
    let label_font = font(LABEL_SIZE);
    let tick_font = font(TICK_SIZE);
    let line_height = text_size(&tick_font, "Ag")?.1;

    // About 18 px a token, within 760..2400 px.
    let y_area = 90;
    let right_margin = MARGIN + 20;
    let width = (tokens.min(1_000) as i32 * 18 + MARGIN + y_area + right_margin).clamp(760, 2400);
    let plot_left = MARGIN + y_area;
    let token_px = f64::from(width - plot_left - right_margin) / tokens as f64;
    let step = label_step(line_height + 5, token_px);
    let x_texts: Vec<(usize, String)> = (0..tokens)
        .step_by(step)
        .map(|index| (index, axis_label(index, &spec.x_labels[index], step > 1)))
        .collect();
    let x_text_width =
        max_text_width(&tick_font, x_texts.iter().map(|(_, t)| t))?.min(MAX_LABEL_WIDTH);
    let x_desc = printable(&spec.x_label);
    let x_desc_height = if x_desc.is_empty() {
        0
    } else {
        line_height + 12
    };
    let x_area = 10 + x_text_width + 8 + x_desc_height;

    let title = fit_width(&title_font, &printable(&spec.title), width - 2 * MARGIN)?;
    let title_height = text_size(&title_font, "Ag")?.1;
    let legend_top = MARGIN + title_height + 12;
    let legend = layout_legend(&tick_font, &spec.series, plot_left, width - right_margin)?;
    let legend_height = legend.last().map_or(0, |entry| entry.row + 1) as i32 * (line_height + 8);
    let plot_top = legend_top + legend_height + 6;
    let height = plot_top + 420 + x_area + MARGIN;

    let mut image = Rendered::blank(width as u32, height as u32);
    {
        let root = BitMapBackend::with_buffer(&mut image.rgb, (image.width, image.height))
            .into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let title_style = title_font
            .color(&TEXT)
            .pos(Pos::new(HPos::Center, VPos::Top));
        draw_text(&root, &title, &title_style, (width / 2, MARGIN))?;
        for entry in &legend {
            let y = legend_top + entry.row as i32 * (line_height + 8) + line_height / 2;
            let sample = [(entry.x, y), (entry.x + LEGEND_SAMPLE, y)];
            root.draw(&PathElement::new(sample, entry.colour.stroke_width(3)))
                .map_err(draw_error)?;
            let style = tick_font
                .color(&TEXT)
                .pos(Pos::new(HPos::Left, VPos::Center));
            draw_text(&root, &entry.text, &style, (entry.x + LEGEND_SAMPLE + 6, y))?;
        }

        let x_range = TokenAxis {
            tokens,
            ticks: x_texts.iter().map(|(index, _)| *index as f64).collect(),
        };
        let mut chart = ChartBuilder::on(&root)
            .margin(MARGIN as u32)
            .margin_top(plot_top as u32)
            .margin_right(right_margin as u32)
            .x_label_area_size(x_area as u32)
            .y_label_area_size(y_area as u32)
            .build_cartesian_2d(x_range, y_low..y_high)
            .map_err(draw_error)?;
        let span = y_high - y_low;
        let y_format = |value: &f64| format_value(*value, span);
        let x_format = |_: &f64| String::new();
        chart
            .configure_mesh()
            .x_label_formatter(&x_format)
            .y_label_formatter(&y_format)
            .x_desc(x_desc.as_str())
            .y_desc(printable(&spec.y_label))
            .label_style(tick_font.color(&TEXT))
            .axis_desc_style(label_font.color(&TEXT))
            .axis_style(AXIS)
            .bold_line_style(RGBColor(232, 232, 232))
            .light_line_style(WHITE)
            .draw()
            .map_err(draw_error)?;

        if y_low < 0.0 && y_high > 0.0 {
            let zero = [(-0.5, 0.0), (tokens as f64 - 0.5, 0.0)];
            chart
                .draw_series(std::iter::once(PathElement::new(
                    zero,
                    AXIS.stroke_width(1),
                )))
                .map_err(draw_error)?;
        }

        for (marker_index, (_, index)) in spec.markers.iter().enumerate() {
            let x = *index as f64;
            let colour = MARKER_COLOURS[marker_index % MARKER_COLOURS.len()];
            let line = [(x, y_low), (x, y_high)];
            chart
                .draw_series(DashedLineSeries::new(line, 6, 4, colour.stroke_width(2)))
                .map_err(draw_error)?;
        }

        for (series_index, (_, values)) in spec.series.iter().enumerate() {
            let colour = SERIES_COLOURS[series_index % SERIES_COLOURS.len()];
            // Non-finite values split a series into separately drawn runs.
            for segment in finite_segments(values) {
                let points = segment.map(|index| (index as f64, f64::from(values[index])));
                let points: Vec<(f64, f64)> = points.collect();
                if let [point] = points[..] {
                    let (x, y) = chart.backend_coord(&point);
                    let dot = Rectangle::new([(x - 2, y - 2), (x + 3, y + 3)], colour.filled());
                    root.draw(&dot).map_err(draw_error)?;
                } else {
                    chart
                        .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                        .map_err(draw_error)?;
                }
            }
        }

        // Marker labels on a pale box, over the lines, in the headroom.
        let (_, top) = chart.backend_coord(&(0.0, y_high));
        let (right, _) = chart.backend_coord(&(tokens as f64 - 0.5, y_high));
        for (marker_index, (label, index)) in spec.markers.iter().enumerate() {
            let colour = MARKER_COLOURS[marker_index % MARKER_COLOURS.len()];
            let (px, _) = chart.backend_coord(&(*index as f64, y_high));
            let label = printable(label);
            let (text_width, text_height) = text_size(&tick_font, &label)?;
            // Labels that would run off the plot go on the left of the line.
            let text_x = if px + 5 + text_width > right {
                px - 5 - text_width
            } else {
                px + 5
            };
            let y = top + 4 + (marker_index % MARKER_ROWS) as i32 * (line_height + 6);
            let backdrop = [
                (text_x - 2, y - 1),
                (text_x + text_width + 3, y + text_height + 4),
            ];
            root.draw(&Rectangle::new(backdrop, WHITE.mix(0.85).filled()))
                .map_err(draw_error)?;
            let style = tick_font
                .color(&colour)
                .pos(Pos::new(HPos::Left, VPos::Top));
            draw_text(&root, &label, &style, (text_x, y))?;
        }

        // Token labels, rotated to read upwards and ending at the axis.
        let rotated = tick_font
            .color(&TEXT)
            .transform(FontTransform::Rotate270)
            .pos(Pos::new(HPos::Right, VPos::Top));
        for (index, text) in &x_texts {
            let (x, bottom) = chart.backend_coord(&(*index as f64, y_low));
            let text = fit_width(&tick_font, text, MAX_LABEL_WIDTH)?;
            draw_text(&root, &text, &rotated, (x - line_height / 2, bottom + 10))?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(image)
}

/// One series in the legend band between the title and the plot.
struct LegendEntry {
    text: String,
    colour: RGBColor,
    x: i32,
    row: usize,
}

/// Lays legend entries out left to right from `left`, wrapping at `right`.
fn layout_legend(
    font: &FontDesc<'_>,
    series: &[(String, Vec<f32>)],
    left: i32,
    right: i32,
) -> Result<Vec<LegendEntry>, PlotError> {
    let mut entries = Vec::with_capacity(series.len());
    let (mut x, mut row) = (left, 0);
    for (series_index, (name, _)) in series.iter().enumerate() {
        let text = fit_width(font, &printable(name), MAX_LABEL_WIDTH)?;
        let entry_width = LEGEND_SAMPLE + 6 + text_size(font, &text)?.0;
        if x > left && x + entry_width > right {
            (x, row) = (left, row + 1);
        }
        entries.push(LegendEntry {
            text,
            colour: SERIES_COLOURS[series_index % SERIES_COLOURS.len()],
            x,
            row,
        });
        x += entry_width + 22;
    }
    Ok(entries)
}

/// The x axis of a line plot: token `i` sits at `i`, with half a token of
/// room at either end, and tick marks only at the labelled tokens.
struct TokenAxis {
    tokens: usize,
    ticks: Vec<f64>,
}

impl Ranged for TokenAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, (from, to): (i32, i32)) -> i32 {
        let fraction = (value + 0.5) / self.tokens as f64;
        from + (fraction * f64::from(to - from)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        -0.5..self.tokens as f64 - 0.5
    }
}

/// The output file and its directory, checked before any drawing.
struct OutputTarget {
    path: PathBuf,
    dir: PathBuf,
    file_name: OsString,
}

impl OutputTarget {
    fn resolve(path: &Path) -> Result<Self, PlotError> {
        let Some(file_name) = path.file_name() else {
            return Err(PlotError::InvalidPath {
                path: path.to_path_buf(),
            });
        };
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(PlotError::MissingParentDir { dir });
        }
        Ok(Self {
            path: path.to_path_buf(),
            dir,
            file_name: file_name.to_os_string(),
        })
    }

    /// Encodes into a hidden temporary file beside the target, then renames
    /// it over the target; the temporary file is removed on any failure.
    fn write_png(&self, image: &Rendered) -> Result<(), PlotError> {
        static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);
        let mut temp_name = OsString::from(".");
        temp_name.push(&self.file_name);
        // The encoder picks the format from the extension, so keep `.png`.
        let unique = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        temp_name.push(format!(".{}.{unique}.tmp.png", std::process::id()));
        let temp_path = self.dir.join(temp_name);
        let result = self.encode(&temp_path, image).and_then(|()| {
            fs::rename(&temp_path, &self.path).map_err(|source| PlotError::Write {
                path: self.path.clone(),
                source,
            })
        });
        if result.is_err() {
            // Best effort: the encoder may have failed before creating it.
            let _ = fs::remove_file(&temp_path);
        }
        result
    }

    fn encode(&self, temp_path: &Path, image: &Rendered) -> Result<(), PlotError> {
        use plotters::backend::DrawingBackend as _;
        let encode_error = |error: Box<dyn StdError + Send + Sync>| PlotError::Encode {
            path: self.path.clone(),
            source: error,
        };
        let mut backend = BitMapBackend::new(temp_path, (image.width, image.height));
        backend
            .blit_bitmap((0, 0), (image.width, image.height), &image.rgb)
            .map_err(|error| encode_error(Box::new(error)))?;
        backend
            .present()
            .map_err(|error| encode_error(Box::new(error)))
    }
}

/// Registers the embedded font with plotters once per process.
fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered = *REGISTERED
        .get_or_init(|| register_font(FONT_FAMILY, FontStyle::Normal, DEJAVU_SANS).is_ok());
    if registered {
        Ok(())
    } else {
        Err(PlotError::Font)
    }
}

fn font(size: f64) -> FontDesc<'static> {
    (FONT_FAMILY, size).into_font()
}

fn draw_error<E: StdError + Send + Sync + 'static>(error: E) -> PlotError {
    PlotError::Draw {
        source: Box::new(error),
    }
}

fn text_size(font: &FontDesc<'_>, text: &str) -> Result<(i32, i32), PlotError> {
    let (width, height) = font.box_size(text).map_err(draw_error)?;
    Ok((width as i32, height as i32))
}

fn max_text_width<'t>(
    font: &FontDesc<'_>,
    texts: impl Iterator<Item = &'t String>,
) -> Result<i32, PlotError> {
    let mut widest = 0;
    for text in texts {
        widest = widest.max(text_size(font, text)?.0);
    }
    Ok(widest)
}

/// Shortens `text` with an ellipsis until it is at most `max_width` px wide.
fn fit_width(font: &FontDesc<'_>, text: &str, max_width: i32) -> Result<String, PlotError> {
    if text_size(font, text)?.0 <= max_width {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let candidate: String = chars.iter().chain(['…'].iter()).collect();
        if text_size(font, &candidate)?.0 <= max_width {
            return Ok(candidate);
        }
    }
    Ok("…".to_string())
}

/// Draws text, moving it down to undo the upward bias of plotters' ab_glyph
/// layout (glyphs sit about a fifth of the font size above their box).
fn draw_text(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    text: &str,
    style: &TextStyle<'_>,
    (x, y): (i32, i32),
) -> Result<(), PlotError> {
    let shift = (style.font.get_size() * 0.2).round() as i32;
    let position = match style.font.get_transform() {
        FontTransform::None => (x, y + shift),
        FontTransform::Rotate90 => (x - shift, y),
        FontTransform::Rotate180 => (x, y - shift),
        FontTransform::Rotate270 => (x + shift, y),
    };
    area.draw_text(text, style, position).map_err(draw_error)
}

fn tick(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    from: (i32, i32),
    to: (i32, i32),
) -> Result<(), PlotError> {
    area.draw(&PathElement::new([from, to], AXIS.stroke_width(1)))
        .map_err(draw_error)
}

/// Label every `step`-th item so labels `pitch` px apart fit in items
/// `item_px` px apart; steps are 1, 2, 5, 10, 20, 50, ...
fn label_step(pitch: i32, item_px: f64) -> usize {
    let needed = (f64::from(pitch) / item_px.max(1e-9)).ceil().max(1.0) as usize;
    let mut decade = 1usize;
    loop {
        for factor in [1, 2, 5] {
            let step = factor * decade;
            if step >= needed {
                return step;
            }
        }
        decade = decade.saturating_mul(10);
    }
}

/// An axis label for item `index`; when labels are thinned the index leads,
/// so a reader can still tell which token a label belongs to.
fn axis_label(index: usize, raw: &str, thinned: bool) -> String {
    let token = display_token(raw);
    if thinned {
        format!("{index}: {token}")
    } else {
        token
    }
}

/// Makes a token printable (see [`printable`]); a whitespace-only token
/// shows as `␣`, and long tokens are cut with an ellipsis.
fn display_token(raw: &str) -> String {
    let shown = printable(raw);
    if !shown.is_empty() && shown.trim().is_empty() {
        let spaces = shown.chars().count().min(MAX_LABEL_CHARS);
        return "␣".repeat(spaces);
    }
    if shown.chars().count() > MAX_LABEL_CHARS {
        let mut cut: String = shown.chars().take(MAX_LABEL_CHARS - 1).collect();
        cut.push('…');
        return cut;
    }
    shown
}

/// SentencePiece `▁` becomes a space; control and invisible formatting
/// characters are escaped (`\n`, `\u{202e}`).
fn printable(raw: &str) -> String {
    let mut shown = String::with_capacity(raw.len());
    for character in raw.chars() {
        match character {
            '▁' => shown.push(' '),
            '\n' => shown.push_str("\\n"),
            '\t' => shown.push_str("\\t"),
            '\r' => shown.push_str("\\r"),
            c if c.is_control()
                || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}') =>
            {
                let _ = write!(shown, "\\u{{{:x}}}", u32::from(c));
            }
            c => shown.push(c),
        }
    }
    shown
}

/// Linear interpolation through [`DIVERGING`]; `t` is clamped to -1..=1.
fn diverging_colour(t: f64) -> RGBColor {
    let t = if t.is_nan() { 0.0 } else { t.clamp(-1.0, 1.0) };
    for pair in DIVERGING.windows(2) {
        let ((t0, RGBColor(r0, g0, b0)), (t1, RGBColor(r1, g1, b1))) = (pair[0], pair[1]);
        if t <= t1 {
            let w = (t - t0) / (t1 - t0);
            let mix =
                |a: u8, b: u8| (f64::from(a) + w * (f64::from(b) - f64::from(a))).round() as u8;
            return RGBColor(mix(r0, r1), mix(g0, g1), mix(b0, b1));
        }
    }
    DIVERGING[DIVERGING.len() - 1].1
}

/// Formats `value` with enough digits for a scale whose size is `magnitude`.
fn format_value(value: f64, magnitude: f64) -> String {
    if value == 0.0 {
        return "0".to_string();
    }
    let magnitude = magnitude.abs();
    if !(1e-3..1e5).contains(&magnitude) {
        return format!("{value:.2e}");
    }
    let decimals = (2 - magnitude.log10().floor() as i32).clamp(0, 5) as usize;
    let text = format!("{value:.decimals$}");
    // "-0.00" reads oddly next to a zero line.
    if text
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        return "0".to_string();
    }
    text
}

/// The y range for values in `low..=high`, with 8% headroom each side.
fn padded_range(low: f64, high: f64) -> (f64, f64) {
    let span = high - low;
    if span <= f64::EPSILON * high.abs().max(low.abs()).max(1.0) {
        let pad = (high.abs() * 0.1).max(1.0);
        return (low - pad, high + pad);
    }
    (low - span * 0.08, high + span * 0.08)
}

/// Index ranges of consecutive finite values.
fn finite_segments(values: &[f32]) -> Vec<std::ops::Range<usize>> {
    let mut segments = Vec::new();
    let mut start = None;
    for (index, value) in values.iter().enumerate() {
        match (value.is_finite(), start) {
            (true, None) => start = Some(index),
            (false, Some(begin)) => {
                segments.push(begin..index);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(begin) = start {
        segments.push(begin..values.len());
    }
    segments
}

#[cfg(test)]
mod tests;
