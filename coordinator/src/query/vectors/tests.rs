//! Tests of the parent module.
use capture_worker::pt::{PtTensor, StoreDtype, encode_pt};

use super::*;

fn vector_bytes(shape: Vec<usize>, values: &[f32], dtype: StoreDtype) -> Vec<u8> {
    let value = PtValue::Tensor(PtTensor::from_f32(shape, values, dtype));
    encode_pt(&value, "vector").unwrap()
}

/// Writes a `[d]` f32 vector whose first value is `marker`.
fn write_vector(root: &Path, key: &str, marker: f32, width: usize) {
    let path = root.join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut values = vec![0.5; width];
    values[0] = marker;
    std::fs::write(path, vector_bytes(vec![width], &values, StoreDtype::F32)).unwrap();
}

fn write_raw(root: &Path, key: &str, bytes: &[u8]) {
    let path = root.join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

const HARMFUL: &str = "experiments/exp1/extraction/refusal/harmful/vectors";
const JOY: &str = "experiments/exp1/extraction/emotion/joy/vectors";

/// A repository root with one experiment: refusal/harmful has several
/// methods per layer, emotion/joy only layer 12; plus files that are not
/// vectors of the layout.
fn repo_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (file, marker) in [
        ("probe_layer10.pt", 10.0),
        ("probe_layer14.pt", 14.0),
        ("probe_layer16.pt", 16.0),
        ("mean_diff_layer12.pt", 12.2),
        ("mean_diff_layer16.pt", 16.2),
        ("ica_layer16.pt", 16.3),
        ("gradient_layer12.pt", 12.4),
        ("zeta_layer18.pt", 18.9),
        ("alpha_layer18.pt", 18.5),
    ] {
        write_vector(root, &format!("{HARMFUL}/{file}"), marker, 4);
    }
    write_vector(root, &format!("{JOY}/gradient_layer12.pt"), 1.4, 4);
    write_vector(root, &format!("{JOY}/ica_layer12.pt"), 1.3, 4);
    write_raw(root, &format!("{JOY}/notes.json"), b"{}");
    write_raw(root, &format!("{JOY}/probe_all_layers.pt"), b"not read");
    write_raw(
        root,
        "experiments/exp1/inference/raw/residual/set/p1.pt",
        b"x",
    );
    write_raw(root, "README.md", b"hello");
    dir
}

fn request(sources: Vec<VectorSource>, layers: &[usize]) -> VectorRequest {
    VectorRequest {
        sources,
        layers: layers.to_vec(),
        ..VectorRequest::default()
    }
}

fn tree(path: &Path) -> VectorSource {
    VectorSource::Tree(path.to_str().unwrap().to_owned())
}

/// (trait, layer, method, first value) of each vector.
fn summary(vectors: &[TraitVector]) -> Vec<(String, Option<usize>, String, f32)> {
    vectors
        .iter()
        .map(|v| {
            (
                v.trait_name.clone(),
                v.layer,
                v.method.clone().unwrap_or_default(),
                v.values[0],
            )
        })
        .collect()
}

fn row(
    name: &str,
    layer: usize,
    method: &str,
    marker: f32,
) -> (String, Option<usize>, String, f32) {
    (name.to_owned(), Some(layer), method.to_owned(), marker)
}

#[test]
fn vector_file_names_give_method_and_layer() {
    assert_eq!(
        parse_vector_file_name("probe_layer16.pt"),
        Some(("probe".to_owned(), 16))
    );
    assert_eq!(
        parse_vector_file_name("mean_diff_layer3.pt"),
        Some(("mean_diff".to_owned(), 3))
    );
    assert_eq!(
        parse_vector_file_name("a_layer2_layer7.pt"),
        Some(("a_layer2".to_owned(), 7))
    );
    for bad in [
        "probe_layer.pt",
        "_layer3.pt",
        "probe_layer16.pth",
        "probe_layerx.pt",
        "probe_layer-1.pt",
        "probe.pt",
    ] {
        assert_eq!(parse_vector_file_name(bad), None, "{bad}");
    }
    assert_eq!(
        VectorSource::guess("s3://b/x/probe_layer1.pt"),
        VectorSource::File("s3://b/x/probe_layer1.pt".into())
    );
    assert_eq!(
        VectorSource::guess("s3://b/x/"),
        VectorSource::Tree("s3://b/x/".into())
    );
}

#[test]
fn vectors_of_every_dtype_and_shape_decode() {
    let values = [1.0, -2.0, 0.5];
    for dtype in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
        for shape in [vec![3], vec![1, 3], vec![3, 1]] {
            let bytes = vector_bytes(shape.clone(), &values, dtype);
            assert_eq!(
                decode_vector(&bytes, "v.pt").unwrap(),
                values,
                "{dtype} {shape:?}"
            );
        }
    }
}

#[test]
fn unusable_vectors_are_refused_with_a_reason() {
    let tensor = |shape: Vec<usize>, values: &[f32]| {
        PtValue::Tensor(PtTensor::from_f32(shape, values, StoreDtype::F32))
    };
    let error = |value: PtValue| {
        let bytes = encode_pt(&value, "archive").unwrap();
        let msg = decode_vector(&bytes, "/v/x.pt").unwrap_err().to_string();
        assert!(msg.starts_with("invalid trait vector /v/x.pt: "), "{msg}");
        assert!(!msg.ends_with('.'), "{msg}");
        msg
    };
    let dict = PtValue::Dict(vec![
        ("vector".into(), tensor(vec![2], &[1.0, 2.0])),
        ("layer".into(), PtValue::Int(16)),
    ]);
    let msg = error(dict);
    assert!(
        msg.contains("a dict with keys \"vector\", \"layer\", not a tensor"),
        "{msg}"
    );
    assert!(error(PtValue::List(vec![])).contains("holds a list, not a tensor"));
    assert!(error(tensor(vec![2, 3], &[1.0; 6])).contains("shape [2, 3]; expected"));
    assert!(error(tensor(vec![1, 1, 3], &[1.0; 3])).contains("shape [1, 1, 3]"));
    assert!(error(tensor(vec![], &[1.0])).contains("shape []"));
    assert!(error(tensor(vec![0], &[])).contains("it is empty (shape [0])"));
    assert!(error(tensor(vec![1, 0], &[])).contains("it is empty"));
    assert!(error(tensor(vec![3], &[1.0, f32::NAN, 2.0])).contains("value 1 is NaN"));
    assert!(error(tensor(vec![2], &[f32::NEG_INFINITY, 2.0])).contains("value 0 is -inf"));
    assert!(error(tensor(vec![3], &[0.0; 3])).contains("all values are zero"));
    let ints = PtValue::Tensor(PtTensor {
        dtype: PtDtype::I64,
        shape: vec![2],
        data: vec![0; 16].into(),
    });
    assert!(error(ints).contains("int64"));
    let msg = decode_vector(b"not a zip", "x.pt").unwrap_err().to_string();
    assert!(
        msg.starts_with("cannot decode trait vector x.pt: "),
        "{msg}"
    );
}

#[tokio::test]
async fn trees_give_the_preferred_method_per_trait_and_layer() {
    let dir = repo_tree();
    let root = dir.path();
    let want = vec![
        row("emotion/joy", 12, "ica", 1.3),
        row("refusal/harmful", 12, "mean_diff", 12.2),
        row("refusal/harmful", 16, "probe", 16.0),
        row("refusal/harmful", 18, "alpha", 18.5),
    ];
    // The three root forms resolve to the same vectors; joy has no
    // vector at 16 or 18 and is skipped there, as no trait was named.
    for tree_root in [
        root.to_owned(),
        root.join("experiments/exp1"),
        root.join("experiments/exp1/extraction"),
    ] {
        let vectors = load_vectors(&request(vec![tree(&tree_root)], &[12, 16, 18]))
            .await
            .unwrap();
        assert_eq!(summary(&vectors), want, "{}", tree_root.display());
    }
    let vectors = load_vectors(&request(vec![tree(root)], &[12, 16, 18]))
        .await
        .unwrap();
    assert_eq!(
        vectors[2].source,
        root.join(HARMFUL)
            .join("probe_layer16.pt")
            .display()
            .to_string()
    );
    assert_eq!(vectors[2].width(), 4);
    assert!((vectors[2].norm() - (256.0f64 + 3.0 * 0.25).sqrt()).abs() < 1e-9);

    // A named method; no layers: every layer that method has.
    let by_method = VectorRequest {
        method: Some("probe".into()),
        ..request(vec![tree(root)], &[])
    };
    assert_eq!(
        summary(&load_vectors(&by_method).await.unwrap()),
        vec![
            row("refusal/harmful", 10, "probe", 10.0),
            row("refusal/harmful", 14, "probe", 14.0),
            row("refusal/harmful", 16, "probe", 16.0),
        ]
    );
    // No layers and no method: every layer, preferred method each.
    let all = load_vectors(&request(vec![tree(root)], &[])).await.unwrap();
    assert_eq!(all.len(), 5 + 1);
}

#[tokio::test]
async fn named_traits_without_a_vector_say_what_exists() {
    let dir = repo_tree();
    let source = vec![tree(dir.path())];
    let named = |traits: &[&str], method: Option<&str>, layers: &[usize]| VectorRequest {
        traits: traits.iter().map(|t| (*t).to_owned()).collect(),
        method: method.map(str::to_owned),
        ..request(source.clone(), layers)
    };
    let message = |request: VectorRequest| async move {
        load_vectors(&request).await.unwrap_err().to_string()
    };

    assert_eq!(
        message(named(&["refusal/harmful"], Some("probe"), &[12])).await,
        "no vector for refusal/harmful at layer 12: layers available 10, 14, 16 \
         (method probe); layer 12 has methods gradient, mean_diff"
    );
    assert_eq!(
        message(named(&["refusal/harmful"], None, &[11])).await,
        "no vector for refusal/harmful at layer 11: layers available 10, 12, 14, 16, 18 \
         (methods alpha, gradient, ica, mean_diff, probe, zeta)"
    );
    assert_eq!(
        message(named(&["emotion/joy"], Some("probe"), &[])).await,
        "no vector for emotion/joy with method probe: it has no vectors with method \
         probe; methods available gradient, ica"
    );
    assert_eq!(
        message(named(&["refusal/harmless"], None, &[12])).await,
        "unknown trait \"refusal/harmless\": traits available are emotion/joy, refusal/harmful"
    );
    let only_joy = load_vectors(&named(&["emotion/joy"], None, &[12]))
        .await
        .unwrap();
    assert_eq!(summary(&only_joy), vec![row("emotion/joy", 12, "ica", 1.3)]);
}

#[tokio::test]
async fn several_experiments_need_a_choice() {
    let dir = repo_tree();
    let root = dir.path();
    write_vector(
        root,
        "experiments/exp2/extraction/refusal/harmful/vectors/probe_layer12.pt",
        2.0,
        4,
    );
    let msg = load_vectors(&request(vec![tree(root)], &[12]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.ends_with("holds vectors of several experiments (exp1, exp2): name one, or point the source at experiments/{experiment}"),
        "{msg}"
    );
    let exp2 = VectorRequest {
        experiment: Some("exp2".into()),
        ..request(vec![tree(root)], &[12])
    };
    assert_eq!(
        summary(&load_vectors(&exp2).await.unwrap()),
        vec![row("refusal/harmful", 12, "probe", 2.0)]
    );
    let missing = VectorRequest {
        experiment: Some("exp9".into()),
        ..exp2
    };
    let msg = load_vectors(&missing).await.unwrap_err().to_string();
    assert!(
        msg.contains("experiments with vectors are exp1, exp2"),
        "{msg}"
    );
}

#[tokio::test]
async fn trees_without_vectors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_raw(dir.path(), "experiments/e/inference/x.pt", b"x");
    let msg = load_vectors(&request(vec![tree(dir.path())], &[1]))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("no trait vectors under "), "{msg}");
    assert!(
        msg.contains("expected experiments/{exp}/extraction/"),
        "{msg}"
    );
    let missing = dir.path().join("absent");
    let msg = load_vectors(&request(vec![tree(&missing)], &[1]))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("cannot read "), "{msg}");
    assert!(matches!(
        load_vectors(&VectorRequest::default()).await,
        Err(VectorError::NoSources)
    ));
}

#[tokio::test]
async fn single_files_apply_to_their_named_layer_or_to_all() {
    let dir = repo_tree();
    let probe16 = dir.path().join(HARMFUL).join("probe_layer16.pt");
    let file = VectorSource::File(probe16.to_str().unwrap().to_owned());

    let vectors = load_vectors(&request(vec![file.clone()], &[16]))
        .await
        .unwrap();
    assert_eq!(
        summary(&vectors),
        vec![row("refusal/harmful", 16, "probe", 16.0)]
    );

    let msg = load_vectors(&VectorRequest {
        traits: vec!["refusal/harmful".into()],
        ..request(vec![file.clone()], &[12, 16])
    })
    .await
    .unwrap_err()
    .to_string();
    assert_eq!(
        msg,
        "no vector for refusal/harmful at layer 12: layers available 16 (method probe); \
         a file named {method}_layer{L}.pt applies to layer L only"
    );

    let everywhere = VectorRequest {
        files_for_every_layer: true,
        ..request(vec![file], &[12, 16])
    };
    let vectors = load_vectors(&everywhere).await.unwrap();
    assert_eq!(vectors.len(), 1);
    assert_eq!(vectors[0].layer, None);
    assert!(vector_for(&vectors, "refusal/harmful", 3).is_some());

    // Outside the layout: the file name is the trait, every layer.
    let loose = dir.path().join("direction.pt");
    write_vector(dir.path(), "direction.pt", 7.0, 4);
    let vectors = load_vectors(&request(
        vec![VectorSource::File(loose.to_str().unwrap().to_owned())],
        &[12],
    ))
    .await
    .unwrap();
    assert_eq!(vectors[0].trait_name, "direction");
    assert_eq!(
        (vectors[0].method.as_deref(), vectors[0].layer),
        (None, None)
    );
}

#[tokio::test]
async fn a_trait_given_twice_for_a_layer_is_refused() {
    let dir = repo_tree();
    let probe12 = dir
        .path()
        .join("elsewhere/refusal/harmful/vectors/probe_layer12.pt");
    write_vector(
        dir.path(),
        "elsewhere/refusal/harmful/vectors/probe_layer12.pt",
        3.0,
        4,
    );
    let sources = vec![
        tree(dir.path()),
        VectorSource::File(probe12.to_str().unwrap().to_owned()),
    ];
    let msg = load_vectors(&request(sources, &[12]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("vector refusal/harmful at layer 12 is given twice: by "),
        "{msg}"
    );
    assert!(msg.contains("/mean_diff_layer12.pt"), "{msg}");
    assert!(
        msg.contains("/elsewhere/refusal/harmful/vectors/probe_layer12.pt"),
        "{msg}"
    );
}

#[tokio::test]
async fn trees_and_files_load_from_local_store_urls() {
    let dir = repo_tree();
    let url = format!("file://{}", dir.path().display());
    let from_store = load_vectors(&request(
        vec![VectorSource::Tree(url.clone())],
        &[12, 16, 18],
    ))
    .await
    .unwrap();
    let from_path = load_vectors(&request(vec![tree(dir.path())], &[12, 16, 18]))
        .await
        .unwrap();
    assert_eq!(summary(&from_store), summary(&from_path));
    assert_eq!(
        from_store[2].source,
        format!("{url}/{HARMFUL}/probe_layer16.pt")
    );
    let experiment_url = format!("{url}/experiments/exp1/");
    let from_experiment = load_vectors(&request(vec![VectorSource::Tree(experiment_url)], &[12]))
        .await
        .unwrap();
    assert_eq!(summary(&from_experiment), summary(&from_path[..2]));

    let file_url = format!("{url}/{JOY}/ica_layer12.pt");
    let vectors = load_vectors(&request(vec![VectorSource::guess(&file_url)], &[12]))
        .await
        .unwrap();
    assert_eq!(summary(&vectors), vec![row("emotion/joy", 12, "ica", 1.3)]);
    assert_eq!(vectors[0].source, file_url);

    let missing = format!("{url}/absent");
    let msg = load_vectors(&request(vec![VectorSource::Tree(missing)], &[12]))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("cannot read "), "{msg}");
    assert!(
        !dir.path().join("absent").exists(),
        "reading creates nothing"
    );
    let msg = load_vectors(&request(
        vec![VectorSource::File(format!("{url}/{JOY}/gone_layer12.pt"))],
        &[12],
    ))
    .await
    .unwrap_err()
    .to_string();
    assert!(msg.ends_with("gone_layer12.pt not found"), "{msg}");
    let msg = load_vectors(&request(
        vec![VectorSource::File("s3://bucket".into())],
        &[1],
    ))
    .await
    .unwrap_err()
    .to_string();
    assert!(msg.contains("it names no file"), "{msg}");
}

#[test]
fn lookups_and_width_checks() {
    let vector = |name: &str, layer: Option<usize>, width: usize| TraitVector {
        trait_name: name.to_owned(),
        method: None,
        layer,
        source: format!("s3://b/{name}.pt"),
        values: vec![1.0; width],
    };
    let vectors = vec![
        vector("refusal/harmful", Some(12), 2304),
        vector("refusal/harmful", None, 2304),
        vector("emotion/joy", Some(16), 2304),
    ];
    let found = vector_for(&vectors, "refusal/harmful", 12).unwrap();
    assert_eq!(found.layer, Some(12));
    assert_eq!(
        vector_for(&vectors, "refusal/harmful", 3).unwrap().layer,
        None
    );
    assert!(vector_for(&vectors, "emotion/joy", 12).is_none());
    assert!(vector_for(&vectors, "other", 16).is_none());
    assert_eq!(
        trait_names(&vectors),
        vec!["emotion/joy", "refusal/harmful"]
    );
    check_width(&vectors, 2304).unwrap();

    let narrow = vec![vector("refusal/harmful", Some(12), 2048)];
    assert_eq!(
        check_width(&narrow, 2304).unwrap_err().to_string(),
        "vector refusal/harmful (file s3://b/refusal/harmful.pt) has 2048 values but \
         the model's hidden size is 2304"
    );
}
