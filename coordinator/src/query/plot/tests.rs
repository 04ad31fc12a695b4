//! Tests of the parent module.
use super::*;

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Width and height from the IHDR chunk, which must come first.
fn png_dimensions(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(bytes[..8], PNG_SIGNATURE, "png signature");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk");
    let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (word(16), word(20))
}

fn pixel(image: &Rendered, (x, y): (i32, i32)) -> (u8, u8, u8) {
    let at = (y as usize * image.width as usize + x as usize) * 3;
    (image.rgb[at], image.rgb[at + 1], image.rgb[at + 2])
}

fn is_red((r, g, b): (u8, u8, u8)) -> bool {
    r > 150 && i32::from(r) - i32::from(g) > 80 && i32::from(r) - i32::from(b) > 80
}

fn is_blue((r, g, b): (u8, u8, u8)) -> bool {
    b > 150 && i32::from(b) - i32::from(r) > 80 && i32::from(b) - i32::from(g) > 40
}

fn is_dark((r, g, b): (u8, u8, u8)) -> bool {
    r < 110 && g < 110 && b < 110
}

fn small_heatmap() -> Heatmap {
    Heatmap {
        title: "honesty score".to_string(),
        row_labels: ["<bos>", "▁The", "▁sky", "\n"].map(String::from).to_vec(),
        col_labels: ["0", "1", "2"].map(String::from).to_vec(),
        // Row 0 positive, row 1 negative, row 2 zero, row 3 has a NaN.
        values: vec![
            2.0,
            1.5,
            2.0, //
            -2.0,
            -1.5,
            -2.0, //
            0.0,
            0.0,
            0.0, //
            0.5,
            f32::NAN,
            -0.5,
        ],
        value_label: "projection".to_string(),
    }
}

fn line_plot(tokens: usize) -> LinePlot {
    LinePlot {
        title: "score over response".to_string(),
        x_label: "token".to_string(),
        y_label: "projection".to_string(),
        x_labels: (0..tokens).map(|i| format!("▁tok{i}")).collect(),
        series: vec![
            (
                "honesty".to_string(),
                (0..tokens).map(|i| (i as f32 * 0.3).sin()).collect(),
            ),
            (
                "sycophancy".to_string(),
                (0..tokens).map(|i| i as f32 * 0.02 - 0.4).collect(),
            ),
        ],
        markers: vec![("commitment".to_string(), tokens / 2)],
    }
}

fn example_heatmap() -> Heatmap {
    let prompt = "<bos> <start_of_turn> user \n ▁Is ▁it ▁ever ▁okay ▁to ▁lie ▁to ▁protect ▁someone ▁'s ▁feelings ? <end_of_turn> \n <start_of_turn> model \n ▁That ' s ▁a ▁really ▁thoughtful ▁question , ▁and ▁honestly ▁there ▁isn ' t ▁a ▁simple ▁answer . \n\n ▁Many ▁people ▁believe ▁small ▁white ▁lies ▁can ▁be ▁kind , ▁but ▁others ▁argue ▁that ▁honesty ▁builds ▁trust ▁over ▁time ▁.";
    let row_labels: Vec<String> = prompt.split(' ').map(String::from).collect();
    let rows = row_labels.len();
    let cols = 26;
    let values = (0..rows * cols)
        .map(|at| {
            let (row, col) = ((at / cols) as f32, (at % cols) as f32);
            (row * 0.21).sin() * (col / 8.0) + (col - 13.0) * 0.05 * (row * 0.05).cos()
        })
        .collect();
    Heatmap {
        title: "honesty projection, gemma-2-2b-it".to_string(),
        row_labels,
        col_labels: (0..cols).map(|c| c.to_string()).collect(),
        values,
        value_label: "projection onto honesty vector".to_string(),
    }
}

#[test]
fn heatmap_cells_follow_the_diverging_scale() {
    let (image, grid) = render_heatmap(&small_heatmap()).unwrap();
    for col in 0..3 {
        let at = |row| (grid.col_center(col), grid.row_center(row));
        assert!(
            is_red(pixel(&image, at(0))),
            "positive cell is red: {:?}",
            pixel(&image, at(0))
        );
        assert!(
            is_blue(pixel(&image, at(1))),
            "negative cell is blue: {:?}",
            pixel(&image, at(1))
        );
        assert_eq!(pixel(&image, at(2)), (255, 255, 255), "zero cell is white");
    }
    let nan_cell = (grid.col_center(1), grid.row_center(3));
    assert_eq!(
        pixel(&image, nan_cell),
        (190, 190, 190),
        "non-finite cell is grey"
    );
    // Token labels were rendered with the embedded font, left of the grid.
    let label_ink = (0..grid.left - 2)
        .flat_map(|x| (grid.top..grid.top + grid.height).map(move |y| (x, y)))
        .filter(|&at| is_dark(pixel(&image, at)))
        .count();
    assert!(
        label_ink > 50,
        "token labels drawn ({label_ink} dark pixels)"
    );
}

#[test]
fn heatmap_png_writes_a_png_of_the_rendered_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("heatmap.png");
    heatmap_png(&path, &small_heatmap()).unwrap();
    let bytes = fs::read(&path).unwrap();
    let (image, _) = render_heatmap(&small_heatmap()).unwrap();
    assert_eq!(png_dimensions(&bytes), (image.width, image.height));
    assert!(
        bytes.len() > 2_000,
        "png has content ({} bytes)",
        bytes.len()
    );
    let entries: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "no temporary file left behind");
}

#[test]
fn heatmap_size_grows_with_tokens_and_is_capped() {
    let (few, _) = render_heatmap(&small_heatmap()).unwrap();
    let example = example_heatmap();
    assert_eq!(example.row_labels.len() * 26, example.values.len());
    let (many, grid) = render_heatmap(&example).unwrap();
    assert!(many.height > few.height);
    assert!(
        grid.height >= example.row_labels.len() as i32 * 12,
        "rows stay readable"
    );
    let huge = Heatmap {
        row_labels: vec!["x".to_string(); 5_000],
        col_labels: vec!["0".to_string(); 100],
        values: vec![1.0; 500_000],
        ..small_heatmap()
    };
    let (capped, _) = render_heatmap(&huge).unwrap();
    assert!(
        capped.width <= 2400 && capped.height <= 2400,
        "{}x{}",
        capped.width,
        capped.height
    );
}

#[test]
fn example_heatmap_renders_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("example.png");
    heatmap_png(&path, &example_heatmap()).unwrap();
    let (width, height) = png_dimensions(&fs::read(&path).unwrap());
    assert!(width > 800 && height > 1000, "{width}x{height}");
}

#[test]
fn line_png_draws_series_and_markers() {
    let spec = line_plot(40);
    let image = render_line(&spec).unwrap();
    let count = |colour: RGBColor| {
        image
            .rgb
            .chunks_exact(3)
            .filter(|p| (p[0], p[1], p[2]) == (colour.0, colour.1, colour.2))
            .count()
    };
    assert!(count(SERIES_COLOURS[0]) > 200, "first series drawn");
    assert!(count(SERIES_COLOURS[1]) > 200, "second series drawn");
    assert!(count(MARKER_COLOURS[0]) > 100, "marker drawn");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("line.png");
    line_png(&path, &spec).unwrap();
    let bytes = fs::read(&path).unwrap();
    assert_eq!(png_dimensions(&bytes), (image.width, image.height));
}

#[test]
fn line_plot_skips_non_finite_points() {
    let mut spec = line_plot(12);
    spec.series[0].1[3] = f32::NAN;
    spec.series[0].1[7] = f32::INFINITY;
    render_line(&spec).unwrap();
    spec.series = vec![("empty".to_string(), vec![f32::NAN; 12])];
    assert!(matches!(
        render_line(&spec),
        Err(PlotError::NoFiniteValues { .. })
    ));
    assert_eq!(
        finite_segments(&[1.0, f32::NAN, 2.0, 3.0]),
        vec![0..1, 2..4]
    );
}

#[test]
fn invalid_input_is_rejected() {
    let mut mismatch = small_heatmap();
    mismatch.values.pop();
    let error = render_heatmap(&mismatch).err().unwrap();
    assert!(matches!(
        error,
        PlotError::ShapeMismatch {
            expected: 12,
            actual: 11,
            ..
        }
    ));
    assert!(error.to_string().contains("expected 12"), "{error}");

    let mut empty = small_heatmap();
    empty.row_labels.clear();
    empty.values.clear();
    assert!(matches!(
        render_heatmap(&empty),
        Err(PlotError::Empty { what: "row_labels" })
    ));

    let mut all_nan = small_heatmap();
    all_nan.values = vec![f32::NAN; 12];
    assert!(matches!(
        render_heatmap(&all_nan),
        Err(PlotError::NoFiniteValues { .. })
    ));

    let mut short_series = line_plot(10);
    short_series.series[1].1.pop();
    let error = render_line(&short_series).err().unwrap();
    assert!(
        error.to_string().contains("series \"sycophancy\""),
        "{error}"
    );

    let mut no_tokens = line_plot(10);
    no_tokens.x_labels.clear();
    assert!(matches!(
        render_line(&no_tokens),
        Err(PlotError::Empty { what: "x_labels" })
    ));

    let mut far_marker = line_plot(10);
    far_marker.markers = vec![("end".to_string(), 10)];
    assert!(matches!(
        render_line(&far_marker),
        Err(PlotError::MarkerOutOfRange {
            index: 10,
            len: 10,
            ..
        })
    ));
}

#[test]
fn missing_directory_is_reported_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-here");
    let error = heatmap_png(&missing.join("plot.png"), &small_heatmap()).unwrap_err();
    match &error {
        PlotError::MissingParentDir { dir } => assert_eq!(dir, &missing),
        other => panic!("unexpected error {other}"),
    }
    assert!(error.to_string().contains("not-here"), "{error}");
    assert!(!missing.exists());
    let error = line_png(&missing.join("line.png"), &line_plot(5)).unwrap_err();
    assert!(matches!(error, PlotError::MissingParentDir { .. }));
}

#[test]
fn failed_write_names_the_path_and_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    // A directory in the way makes the final rename fail.
    let blocked = dir.path().join("blocked.png");
    fs::create_dir(&blocked).unwrap();
    fs::write(blocked.join("keep"), b"x").unwrap();
    let error = heatmap_png(&blocked, &small_heatmap()).unwrap_err();
    assert!(matches!(error, PlotError::Write { .. }), "{error}");
    assert!(error.to_string().contains("blocked.png"), "{error}");
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![OsString::from("blocked.png")]);
}

#[test]
fn tokens_are_made_printable() {
    assert_eq!(display_token("▁the"), " the");
    assert_eq!(display_token("a\nb\tc\r"), "a\\nb\\tc\\r");
    assert_eq!(display_token("x\u{7}\u{202e}y"), "x\\u{7}\\u{202e}y");
    assert_eq!(display_token("▁▁"), "␣␣");
    assert_eq!(display_token(""), "");
    let long = display_token(&"z".repeat(40));
    assert_eq!(long.chars().count(), MAX_LABEL_CHARS);
    assert!(long.ends_with('…'));
    assert_eq!(axis_label(12, "▁sky", true), "12:  sky");
}

#[test]
fn helpers_pick_readable_steps_colours_and_numbers() {
    assert_eq!(label_step(16, 18.0), 1);
    assert_eq!(label_step(16, 10.0), 2);
    assert_eq!(label_step(16, 5.0), 5);
    assert_eq!(label_step(16, 0.5), 50);
    assert_eq!(diverging_colour(0.0), RGBColor(255, 255, 255));
    assert_eq!(diverging_colour(1.0), RGBColor(178, 24, 43));
    assert_eq!(diverging_colour(-7.0), RGBColor(33, 102, 172));
    assert_eq!(format_value(1.6, 3.2), "1.60");
    assert_eq!(format_value(-60.0, 120.0), "-60");
    assert_eq!(format_value(0.025, 0.05), "0.0250");
    assert_eq!(format_value(2.5e6, 5e6), "2.50e6");
    assert_eq!(padded_range(1.0, 1.0), (0.0, 2.0));
}
