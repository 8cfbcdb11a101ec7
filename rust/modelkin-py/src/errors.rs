//! The Python exception hierarchy, mapped from the core's one error enum.

use std::io::ErrorKind;

use modelkin_core::Error;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

pyo3::create_exception!(modelkin, ModelkinError, PyException, "Base class of every modelkin error.");
pyo3::create_exception!(
    modelkin,
    InvalidModelError,
    ModelkinError,
    "A model file is corrupt or not valid safetensors."
);
pyo3::create_exception!(
    modelkin,
    UnsupportedFormatError,
    ModelkinError,
    "A model is in a format modelkin refuses to read."
);
pyo3::create_exception!(
    modelkin,
    MissingTensorError,
    ModelkinError,
    "A model lacks a tensor that the base model has."
);
pyo3::create_exception!(
    modelkin,
    ShapeMismatchError,
    ModelkinError,
    "A tensor's shape differs from the base model's."
);
pyo3::create_exception!(
    modelkin,
    DtypeError,
    ModelkinError,
    "A tensor is stored in a dtype modelkin cannot decode."
);
pyo3::create_exception!(modelkin, NonFiniteError, ModelkinError, "A tensor holds NaN or infinite values.");
pyo3::create_exception!(
    modelkin,
    ModelReferenceError,
    ModelkinError,
    "A model reference is invalid or cannot be resolved."
);

/// `RecipeError(ModelkinError, ValueError)`: a bad recipe, argument or option. It has two bases,
/// which `create_exception!` cannot make, so it is built with `type()` once.
static RECIPE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn recipe_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    RECIPE_ERROR
        .get_or_try_init(py, || {
            let bases = PyTuple::new(py, [py.get_type::<ModelkinError>(), py.get_type::<PyValueError>()])?;
            let namespace = PyDict::new(py);
            namespace.set_item("__module__", "modelkin")?;
            namespace.set_item(
                "__doc__",
                "A merge recipe, argument or option is invalid; the message names the key (and, for YAML, its line).",
            )?;
            let class = py.get_type::<PyType>().call1(("RecipeError", bases, namespace))?;
            Ok(class.cast_into::<PyType>()?.unbind())
        })
        .map(|class| class.bind(py))
}

/// Converts a core error into the matching Python exception.
pub fn to_py(error: Error) -> PyErr {
    let message = error.to_string();
    match &error {
        Error::Io { source, .. } => match source.kind() {
            ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
            ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
            _ => PyOSError::new_err(message),
        },
        Error::InvalidFile { .. } => InvalidModelError::new_err(message),
        Error::UnsupportedFormat { .. } => UnsupportedFormatError::new_err(message),
        Error::MissingTensor { .. } => MissingTensorError::new_err(message),
        Error::ShapeMismatch { .. } => ShapeMismatchError::new_err(message),
        Error::UnsupportedDtype { .. } => DtypeError::new_err(message),
        Error::NonFinite { .. } => NonFiniteError::new_err(message),
        Error::DuplicateModel { .. } => ModelReferenceError::new_err(message),
        Error::InvalidArgument(_) => Python::attach(|py| match recipe_error(py) {
            Ok(class) => PyErr::from_type(class.clone(), message),
            Err(error) => error,
        }),
        Error::Cancelled => PyKeyboardInterrupt::new_err(message),
    }
}

/// Registers the exception classes on the module.
pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add("ModelkinError", py.get_type::<ModelkinError>())?;
    module.add("InvalidModelError", py.get_type::<InvalidModelError>())?;
    module.add("UnsupportedFormatError", py.get_type::<UnsupportedFormatError>())?;
    module.add("MissingTensorError", py.get_type::<MissingTensorError>())?;
    module.add("ShapeMismatchError", py.get_type::<ShapeMismatchError>())?;
    module.add("DtypeError", py.get_type::<DtypeError>())?;
    module.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    module.add("ModelReferenceError", py.get_type::<ModelReferenceError>())?;
    module.add("RecipeError", recipe_error(py)?)?;
    Ok(())
}
