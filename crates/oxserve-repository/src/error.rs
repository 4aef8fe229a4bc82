use std::{io, path::PathBuf};

/// A model configuration that cannot be read, parsed or accepted. Messages are short and
/// user-facing: they are shown in the repository index and logs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `config.pbtxt` is not valid protobuf text format for our schema.
    #[error("config.pbtxt: {message}{}", location(*.position))]
    Parse {
        message: String,
        /// 1-based line and column, when the parser reports where.
        position: Option<(usize, usize)>,
    },
    #[error("invalid model config JSON: {0}")]
    Json(String),
    #[error("invalid config for model '{model}': {message}")]
    Invalid { model: String, message: String },
    #[error("unexpected directory name '{dir}' for model '{name}', directory name must equal model name")]
    NameMismatch { dir: String, name: String },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn location(position: Option<(usize, usize)>) -> String {
    match position {
        Some((line, column)) => format!(" at line {line}, column {column}"),
        None => String::new(),
    }
}

/// A problem with the repository's directory structure or files outside `config.pbtxt`.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("cannot read model repository {}: {source}", path.display())]
    Root {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid label file name '{0}': must be a file name in the model directory")]
    InvalidLabelFile(String),
}
