//! The one error type of the core. Every variant renders as a single line that names the file
//! (and the tensor, where one is involved), because that line is what a CLI user sees.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while reading models or computing kinship.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a file the user named (missing, unreadable, ...).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory the operation was about.
        path: PathBuf,
        /// The underlying error; its kind decides the Python exception.
        #[source]
        source: io::Error,
    },
    /// The file exists but is not a valid safetensors file (truncated, bad header, bad offsets).
    #[error("{}: invalid safetensors file: {reason}", path.display())]
    InvalidFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The reference points at something modelkin refuses to read (pickle, nothing usable).
    #[error("{}: {reason}", path.display())]
    UnsupportedFormat {
        /// The file or directory.
        path: PathBuf,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A tensor the base model has is absent from another model.
    #[error("{}: tensor '{tensor}' is missing (the base model has it)", path.display())]
    MissingTensor {
        /// The model lacking the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// Shapes of a tensor disagree between the base and another model.
    #[error("{}: tensor '{tensor}' has shape {found:?}, the base model has {expected:?}", path.display())]
    ShapeMismatch {
        /// The model whose tensor disagrees with the base.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The base model's shape (after the vocabulary row cut).
        expected: Vec<usize>,
        /// This model's shape (after the vocabulary row cut).
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype that cannot be decoded as a float.
    #[error("{}: tensor '{tensor}' has unsupported dtype {dtype} (supported: F64, F32, F16, BF16, F8_E4M3, F8_E5M2)", path.display())]
    UnsupportedDtype {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dtype as written in the header.
        dtype: String,
    },
    /// A tensor holds NaN or infinite values.
    #[error("{}: tensor '{tensor}' contains NaN or Inf values (pass --skip-nonfinite to leave such tensors out)", path.display())]
    NonFinite {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// The same model is given twice where all must differ.
    #[error("{}: the same model is given twice; all models must be different", path.display())]
    DuplicateModel {
        /// The model given twice.
        path: PathBuf,
    },
    /// The caller asked for something inconsistent: a merge job or option out of its range, a
    /// method without the base it needs, no models.
    #[error("{0}")]
    InvalidArgument(String),
    /// The pass was stopped by the caller (Ctrl-C).
    #[error("interrupted")]
    Cancelled,
}

/// Result alias for the core.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn invalid_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::InvalidFile { path: path.into(), reason: reason.into() }
    }
}
