//! Triton's repository layout: `<root>/<model>/config.pbtxt`, `<root>/<model>/<version>/<file>`
//! and label files next to `config.pbtxt`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::{
    config::{is_plain_file_name, parse_config_text},
    error::{ConfigError, RepositoryError},
    pb::{self, model_version_policy::PolicyChoice},
};

/// A model directory directly under the repository root. `name` is the directory name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDir {
    pub name: String,
    pub path: PathBuf,
}

/// Names of the directory's entries that are directories (symlinks followed), skipping
/// hidden entries and names that are not UTF-8.
fn subdirectories(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Ok(name) = entry.file_name().into_string() else {
            tracing::warn!(path = %path.display(), "skipping entry whose name is not UTF-8");
            continue;
        };
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        out.push((name, path));
    }
    Ok(out)
}

/// The model directories under `root`, sorted by name. Files and hidden entries are skipped.
pub fn list_models(root: &Path) -> Result<Vec<ModelDir>, RepositoryError> {
    let mut models: Vec<ModelDir> = subdirectories(root)
        .map_err(|source| RepositoryError::Root {
            path: root.to_owned(),
            source,
        })?
        .into_iter()
        .map(|(name, path)| ModelDir { name, path })
        .collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(models)
}

/// Checks that a repository root is a directory this process can list. The server refuses to
/// start otherwise, as Triton does: a server that reported ready while serving nothing would
/// hide the mistake.
pub fn check_repository(root: &Path) -> Result<(), RepositoryError> {
    list_models(root).map(|_| ())
}

/// Reads `config.pbtxt`, or a config with only `name` when the file is absent (the engine
/// completes it from the model file). The config's name must equal the directory name.
pub fn read_model_config(dir: &ModelDir) -> Result<pb::ModelConfig, ConfigError> {
    let path = dir.path.join("config.pbtxt");
    let mut cfg = match fs::read_to_string(&path) {
        Ok(text) => parse_config_text(&text)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => pb::ModelConfig::default(),
        Err(source) => return Err(ConfigError::Io { path, source }),
    };
    if cfg.name.is_empty() {
        cfg.name.clone_from(&dir.name);
    } else if cfg.name != dir.name {
        return Err(ConfigError::NameMismatch {
            dir: dir.name.clone(),
            name: cfg.name,
        });
    }
    Ok(cfg)
}

/// Version numbers under a model directory, ascending. Only subdirectories named by a
/// positive decimal number without leading zeros count ("01", "0" and "v1" are ignored).
pub fn list_versions(model_dir: &Path) -> Result<Vec<u64>, RepositoryError> {
    let entries = subdirectories(model_dir).map_err(|source| RepositoryError::Io {
        path: model_dir.to_owned(),
        source,
    })?;
    let mut versions: Vec<u64> = entries
        .into_iter()
        .filter(|(name, _)| {
            !name.is_empty() && !name.starts_with('0') && name.bytes().all(|b| b.is_ascii_digit())
        })
        .filter_map(|(name, _)| name.parse().ok())
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// The versions to serve, ascending. No policy (or an empty one) means the latest version.
pub fn select_versions(policy: Option<&pb::ModelVersionPolicy>, available: &[u64]) -> Vec<u64> {
    let mut available = available.to_vec();
    available.sort_unstable();
    available.dedup();
    let latest = |n: usize| available[available.len().saturating_sub(n)..].to_vec();
    match policy.and_then(|p| p.policy_choice.as_ref()) {
        None => latest(1),
        // validate_config rejects 0; treat it as the proto default here rather than serving none.
        Some(PolicyChoice::Latest(l)) => latest(usize::try_from(l.num_versions.max(1)).unwrap_or(usize::MAX)),
        Some(PolicyChoice::All(_)) => available,
        Some(PolicyChoice::Specific(s)) => available
            .iter()
            .copied()
            .filter(|&v| s.versions.iter().any(|&w| u64::try_from(w) == Ok(v)))
            .collect(),
    }
}

/// The model file of one version: `default_model_filename` if set, else the framework's
/// conventional name (`model.onnx` for ONNX and when nothing says otherwise). A SavedModel may
/// also be the version directory itself (TensorFlow Serving's layout:
/// `<model>/<version>/saved_model.pb`), when there is no `model.savedmodel` in it.
pub fn model_file_path(model_dir: &Path, version: u64, cfg: &pb::ModelConfig) -> PathBuf {
    let version_dir = model_dir.join(version.to_string());
    if cfg.default_model_filename.is_empty() {
        let file = default_file_name(&cfg.platform, &cfg.backend);
        if file == SAVEDMODEL_DIR && !version_dir.join(file).exists() && is_savedmodel(&version_dir) {
            return version_dir;
        }
        return version_dir.join(file);
    }
    version_dir.join(&cfg.default_model_filename)
}

/// Triton's name for a SavedModel inside a version directory.
const SAVEDMODEL_DIR: &str = "model.savedmodel";

fn is_savedmodel(dir: &Path) -> bool {
    dir.join("saved_model.pb").is_file() || dir.join("saved_model.pbtxt").is_file()
}

/// The platform of a model directory whose configuration names none, from its newest
/// version's files: `tensorflow_savedmodel` for a SavedModel (Triton's `model.savedmodel`
/// or TF Serving's bare version directory), else `None` (ONNX, the default).
pub fn detect_platform(model_dir: &Path, versions: &[u64]) -> Option<&'static str> {
    let newest = model_dir.join(versions.iter().max()?.to_string());
    (newest.join(SAVEDMODEL_DIR).is_dir() || is_savedmodel(&newest)).then_some("tensorflow_savedmodel")
}

/// Triton's default model file names by platform / backend.
fn default_file_name(platform: &str, backend: &str) -> &'static str {
    match (platform, backend) {
        ("tensorflow_savedmodel", _) | ("", "tensorflow") => SAVEDMODEL_DIR,
        ("tensorflow_graphdef", _) => "model.graphdef",
        ("pytorch_libtorch", _) | ("", "pytorch") => "model.pt",
        ("tensorrt_plan", _) | ("", "tensorrt") => "model.plan",
        _ => "model.onnx",
    }
}

/// Reads a label file in the model directory: one label per line, in class-index order.
pub fn read_labels(model_dir: &Path, file: &str) -> Result<Vec<String>, RepositoryError> {
    if !is_plain_file_name(file) {
        return Err(RepositoryError::InvalidLabelFile(file.to_owned()));
    }
    let path = model_dir.join(file);
    let text = fs::read_to_string(&path).map_err(|source| RepositoryError::Io { path, source })?;
    Ok(text.lines().map(str::to_owned).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pb::model_version_policy::{All, Latest, Specific};

    fn mkdirs(root: &Path, dirs: &[&str]) {
        for d in dirs {
            fs::create_dir_all(root.join(d)).unwrap();
        }
    }

    fn policy(choice: PolicyChoice) -> pb::ModelVersionPolicy {
        pb::ModelVersionPolicy {
            policy_choice: Some(choice),
        }
    }

    #[test]
    fn savedmodels_in_triton_and_tf_serving_layouts() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("m");
        mkdirs(&model, &["1/model.savedmodel", "2", "3/variables"]);
        fs::write(model.join("1/model.savedmodel/saved_model.pb"), b"").unwrap();
        fs::write(model.join("3/saved_model.pb"), b"").unwrap();
        let cfg = pb::ModelConfig {
            platform: "tensorflow_savedmodel".into(),
            ..Default::default()
        };
        assert_eq!(model_file_path(&model, 1, &cfg), model.join("1/model.savedmodel"));
        assert_eq!(model_file_path(&model, 3, &cfg), model.join("3"));
        // Neither: Triton's name, so the error names what is missing.
        assert_eq!(model_file_path(&model, 2, &cfg), model.join("2/model.savedmodel"));
        assert_eq!(detect_platform(&model, &[1, 3]), Some("tensorflow_savedmodel"));
        assert_eq!(
            detect_platform(&model, &[1, 2]),
            None,
            "the newest version decides"
        );
        assert_eq!(detect_platform(&model, &[1]), Some("tensorflow_savedmodel"));
        assert_eq!(detect_platform(&model, &[]), None);
    }

    #[test]
    fn lists_model_directories_sorted() {
        let root = tempfile::tempdir().unwrap();
        mkdirs(root.path(), &["zeta", "alpha", "Beta", ".hidden", "mid/1"]);
        fs::write(root.path().join("README.md"), "not a model").unwrap();
        let models = list_models(root.path()).unwrap();
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["Beta", "alpha", "mid", "zeta"]);
        assert_eq!(models[1].path, root.path().join("alpha"));
    }

    #[test]
    fn missing_root_is_an_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("nope");
        let err = list_models(&missing).unwrap_err().to_string();
        assert!(err.starts_with("cannot read model repository "), "{err}");
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }

    #[test]
    fn a_repository_must_be_a_readable_directory() {
        let root = tempfile::tempdir().unwrap();
        check_repository(root.path()).unwrap();
        let missing = root.path().join("nope");
        let err = check_repository(&missing).unwrap_err().to_string();
        assert!(err.starts_with("cannot read model repository "), "{err}");
        assert!(err.contains("No such file or directory"), "{err}");
        let file = root.path().join("file");
        fs::write(&file, "not a directory").unwrap();
        let err = check_repository(&file).unwrap_err().to_string();
        assert!(err.contains("Not a directory"), "{err}");
    }

    #[test]
    fn version_directories_follow_tritons_rules() {
        let model = tempfile::tempdir().unwrap();
        mkdirs(model.path(), &["1", "2", "10", "01", "0", "abc", "1a", ".5"]);
        fs::write(model.path().join("3"), "a file, not a version").unwrap();
        fs::write(model.path().join("config.pbtxt"), "").unwrap();
        assert_eq!(list_versions(model.path()).unwrap(), [1, 2, 10]);

        let err = list_versions(&model.path().join("missing")).unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");
    }

    #[test]
    fn default_policy_serves_the_latest_version() {
        assert_eq!(select_versions(None, &[1, 10, 2]), [10]);
        let empty = pb::ModelVersionPolicy { policy_choice: None };
        assert_eq!(select_versions(Some(&empty), &[3, 1]), [3]);
        assert_eq!(select_versions(None, &[]), Vec::<u64>::new());
    }

    #[test]
    fn latest_n_serves_the_highest_versions() {
        let latest = |n| policy(PolicyChoice::Latest(Latest { num_versions: n }));
        assert_eq!(select_versions(Some(&latest(2)), &[1, 10, 2, 3]), [3, 10]);
        assert_eq!(select_versions(Some(&latest(5)), &[4, 2]), [2, 4]);
        assert_eq!(select_versions(Some(&latest(0)), &[4, 2]), [4]);
    }

    #[test]
    fn all_and_specific_policies() {
        let all = policy(PolicyChoice::All(All {}));
        assert_eq!(select_versions(Some(&all), &[3, 1, 2]), [1, 2, 3]);
        let specific = policy(PolicyChoice::Specific(Specific {
            versions: vec![3, 1, 7, -1],
        }));
        assert_eq!(select_versions(Some(&specific), &[1, 2, 3]), [1, 3]);
        assert_eq!(select_versions(Some(&specific), &[2]), Vec::<u64>::new());
    }

    #[test]
    fn reads_config_and_fills_or_checks_the_name() {
        let root = tempfile::tempdir().unwrap();
        mkdirs(root.path(), &["named", "unnamed", "bare", "wrong", "broken"]);
        let write = |dir: &str, text: &str| {
            fs::write(root.path().join(dir).join("config.pbtxt"), text).unwrap();
        };
        write("named", "name: \"named\"\nmax_batch_size: 4\n");
        write("unnamed", "max_batch_size: 2\n");
        write("wrong", "name: \"other\"\n");
        write("broken", "max_batch_size: 2\nbogus: 1\n");
        let dir = |name: &str| ModelDir {
            name: name.to_owned(),
            path: root.path().join(name),
        };

        let named = read_model_config(&dir("named")).unwrap();
        assert_eq!((named.name.as_str(), named.max_batch_size), ("named", 4));
        let unnamed = read_model_config(&dir("unnamed")).unwrap();
        assert_eq!((unnamed.name.as_str(), unnamed.max_batch_size), ("unnamed", 2));
        let bare = read_model_config(&dir("bare")).unwrap();
        assert_eq!(
            bare,
            pb::ModelConfig {
                name: "bare".into(),
                ..Default::default()
            }
        );

        let err = read_model_config(&dir("wrong")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unexpected directory name 'wrong' for model 'other', directory name must equal model name"
        );
        let err = read_model_config(&dir("broken")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config.pbtxt: unknown field 'bogus' in inference.ModelConfig at line 2, column 1"
        );
    }

    #[test]
    fn unreadable_config_is_an_io_error() {
        let root = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        mkdirs(root.path(), &["m/config.pbtxt"]);
        let dir = ModelDir {
            name: "m".into(),
            path: root.path().join("m"),
        };
        let err = read_model_config(&dir).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("config.pbtxt"), "{err}");
    }

    #[test]
    fn model_file_defaults_by_platform() {
        let dir = Path::new("/models/m");
        let cfg = |platform: &str, backend: &str, file: &str| pb::ModelConfig {
            platform: platform.into(),
            backend: backend.into(),
            default_model_filename: file.into(),
            ..Default::default()
        };
        let file = |c: pb::ModelConfig| model_file_path(dir, 3, &c);
        assert_eq!(file(cfg("", "", "")), dir.join("3/model.onnx"));
        assert_eq!(file(cfg("onnxruntime_onnx", "", "")), dir.join("3/model.onnx"));
        assert_eq!(file(cfg("", "onnxruntime", "")), dir.join("3/model.onnx"));
        assert_eq!(file(cfg("", "tract", "")), dir.join("3/model.onnx"));
        assert_eq!(file(cfg("", "", "net.onnx")), dir.join("3/net.onnx"));
        assert_eq!(file(cfg("pytorch_libtorch", "", "")), dir.join("3/model.pt"));
        assert_eq!(
            file(cfg("tensorflow_savedmodel", "", "")),
            dir.join("3/model.savedmodel")
        );
    }

    #[test]
    fn reads_labels_one_per_line() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("labels.txt"), "cat\ndog\r\n\nbird\n").unwrap();
        fs::write(dir.path().join("no_newline.txt"), "a\nb").unwrap();
        assert_eq!(
            read_labels(dir.path(), "labels.txt").unwrap(),
            ["cat", "dog", "", "bird"]
        );
        assert_eq!(read_labels(dir.path(), "no_newline.txt").unwrap(), ["a", "b"]);
        let err = read_labels(dir.path(), "missing.txt").unwrap_err();
        assert!(matches!(err, RepositoryError::Io { .. }), "{err:?}");
    }

    #[test]
    fn label_file_must_stay_in_the_model_directory() {
        let root = tempfile::tempdir().unwrap();
        mkdirs(root.path(), &["m"]);
        fs::write(root.path().join("secret.txt"), "x\n").unwrap();
        let model = root.path().join("m");
        for bad in ["../secret.txt", "..", "sub/labels.txt", "", "/etc/passwd", "a\\b"] {
            let err = read_labels(&model, bad).unwrap_err();
            assert!(
                matches!(err, RepositoryError::InvalidLabelFile(ref f) if f == bad),
                "{bad}: {err:?}"
            );
        }
    }
}
