//! The float32 `acos`/`sin`/`cos` torch gives mergekit's angles.
//!
//! torch built with MKL (its PyPI wheels) computes float32 `acos`, `sin` and `cos` with MKL's
//! vector math library in its high-accuracy mode (`vmsAcos`, `vmsSin`, `vmsCos` with `VML_HA`),
//! whose results are an ulp away from the C library's on a few percent of arguments and whose
//! algorithm is not published. When the job names MKL's runtime library (`libmkl_rt`, from the
//! `mkl` package of the same version torch reports) those functions are called here, so the
//! angles, and the outputs, have torch's bits; otherwise the C library's functions are used.
//! VML's results do not depend on how many values a call takes, so each angle is one call.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::io::error::{Error, Result};

/// `vms*(n, a, r, mode)` with LP64 integers.
type VmlFn = unsafe extern "C" fn(i32, *const f32, *mut f32, i64);

/// `cblas_sdot(n, x, incx, y, incy)` with LP64 integers.
type DotFn = unsafe extern "C" fn(i32, *const f32, i32, *const f32, i32) -> f32;

/// `VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE`, the mode torch's `vml.h` passes.
const MODE: i64 = 0x2 | 0x0014_0000 | 0x100;

/// MKL's VML functions, loaded from one library file.
pub(crate) struct Vml {
    acos: VmlFn,
    sin: VmlFn,
    cos: VmlFn,
    /// torch's float32 `dot` (BLAS `sdot`), when MKL runs it on torch's threads as torch does.
    dot: Option<DotFn>,
    /// Keeps the functions' code mapped.
    _library: libloading::Library,
    /// Intel's OpenMP runtime, which MKL's threaded layer needs loaded first.
    _openmp: Option<libloading::Library>,
}

/// Where float32 angles come from.
#[derive(Clone, Default)]
pub(crate) enum Trig {
    /// The C library's `acosf`, `sinf`, `cosf` (Rust's `f32` methods).
    #[default]
    Libm,
    /// MKL's VML, as torch's MKL builds compute them.
    Mkl(Arc<Vml>),
}

impl std::fmt::Debug for Trig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trig::Libm => "Trig::Libm",
            Trig::Mkl(_) => "Trig::Mkl",
        })
    }
}

impl Trig {
    /// The angles of a job: MKL's when `library` names it (loaded once per file and process).
    pub(crate) fn load(library: Option<&Path>) -> Result<Trig> {
        let Some(path) = library else { return Ok(Trig::Libm) };
        static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<Vml>>>> = OnceLock::new();
        let mut loaded = LOADED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(vml) = loaded.get(path) {
            return Ok(Trig::Mkl(vml.clone()));
        }
        let vml = Arc::new(Vml::open(path)?);
        loaded.insert(path.to_path_buf(), vml.clone());
        Ok(Trig::Mkl(vml))
    }

    fn call(&self, pick: impl Fn(&Vml) -> VmlFn, libm: fn(f32) -> f32, x: f32) -> f32 {
        match self {
            Trig::Libm => libm(x),
            Trig::Mkl(vml) => {
                let mut out = 0.0f32;
                // SAFETY: one value in, one out, both valid for the call; the library stays loaded
                // while `vml` lives.
                unsafe { pick(vml)(1, &x, &mut out, MODE) };
                out
            }
        }
    }

    /// float32 arccosine.
    pub(crate) fn acos(&self, x: f32) -> f32 {
        self.call(|v| v.acos, f32::acos, x)
    }

    /// float32 sine.
    pub(crate) fn sin(&self, x: f32) -> f32 {
        self.call(|v| v.sin, f32::sin, x)
    }

    /// float32 cosine.
    pub(crate) fn cos(&self, x: f32) -> f32 {
        self.call(|v| v.cos, f32::cos, x)
    }

    /// Whether [`Trig::dot`] is available.
    pub(crate) fn has_dot(&self) -> bool {
        matches!(self, Trig::Mkl(vml) if vml.dot.is_some())
    }

    /// torch's float32 `dot` of two vectors (MKL's `sdot` on torch's thread count), where MKL and
    /// its OpenMP runtime are loaded; `None` otherwise.
    pub(crate) fn dot(&self, x: &[f32], y: &[f32]) -> Option<f32> {
        let Trig::Mkl(vml) = self else { return None };
        let n = i32::try_from(x.len()).ok().filter(|_| x.len() == y.len())?;
        // SAFETY: both slices hold n values; the library stays loaded while `vml` lives.
        vml.dot.map(|dot| unsafe { dot(n, x.as_ptr(), 1, y.as_ptr(), 1) })
    }
}

impl Vml {
    fn open(path: &Path) -> Result<Vml> {
        let fail =
            |e: libloading::Error| Error::InvalidArgument(format!("MKL library {}: {e}", path.display()));
        // MKL's threaded layer finds Intel's OpenMP runtime among the loaded libraries: the `mkl`
        // package installs it beside libmkl_rt (`intel-openmp`). Without it MKL runs sequentially,
        // which keeps the angles but not torch's threaded `sdot`.
        let openmp = path.parent().map(|dir| dir.join("libiomp5.so")).filter(|p| p.is_file());
        let openmp = openmp.map(|p| load_global(&p)).transpose().map_err(fail)?;
        // SAFETY: loading MKL runs its initialisers, which have no preconditions.
        let library = unsafe { libloading::Library::new(path) }.map_err(fail)?;
        // SAFETY: the symbols are MKL's documented C functions with these signatures.
        unsafe {
            let set: libloading::Symbol<unsafe extern "C" fn(i32) -> i32> =
                library.get(b"MKL_Set_Interface_Layer\0").map_err(fail)?;
            set(0); // LP64
            let layer: libloading::Symbol<unsafe extern "C" fn(i32) -> i32> =
                library.get(b"MKL_Set_Threading_Layer\0").map_err(fail)?;
            // INTEL (OpenMP) on torch's thread count, as torch runs it; else SEQUENTIAL.
            layer(if openmp.is_some() { 0 } else { 1 });
            let dot = if openmp.is_some() {
                let threads: libloading::Symbol<unsafe extern "C" fn(i32)> =
                    library.get(b"MKL_Set_Num_Threads\0").map_err(fail)?;
                threads(i32::try_from(super::threads::torch_threads()).unwrap_or(1));
                Some(*library.get::<DotFn>(b"cblas_sdot\0").map_err(fail)?)
            } else {
                None
            };
            let acos = *library.get::<VmlFn>(b"vmsAcos\0").map_err(fail)?;
            let sin = *library.get::<VmlFn>(b"vmsSin\0").map_err(fail)?;
            let cos = *library.get::<VmlFn>(b"vmsCos\0").map_err(fail)?;
            Ok(Vml { acos, sin, cos, dot, _library: library, _openmp: openmp })
        }
    }
}

/// Loads a library with its symbols visible to libraries loaded after it.
fn load_global(path: &Path) -> std::result::Result<libloading::Library, libloading::Error> {
    #[cfg(unix)]
    {
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        // SAFETY: loading the OpenMP runtime runs its initialisers, which have no preconditions.
        unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map(Into::into)
    }
    #[cfg(not(unix))]
    {
        // SAFETY: as above.
        unsafe { libloading::Library::new(path) }
    }
}

#[cfg(test)]
mod tests {
    use super::Trig;

    #[test]
    fn without_mkl_the_c_library_gives_the_angles() {
        let trig = Trig::load(None).expect("libm");
        assert_eq!(trig.acos(0.25).to_bits(), 0.25f32.acos().to_bits());
        assert_eq!(trig.sin(1.5).to_bits(), 1.5f32.sin().to_bits());
        assert_eq!(trig.cos(1.5).to_bits(), 1.5f32.cos().to_bits());
    }

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let err = Trig::load(Some(std::path::Path::new("/nonexistent/libmkl_rt.so.2"))).expect_err("error");
        assert!(err.to_string().contains("/nonexistent/libmkl_rt.so.2"), "{err}");
    }
}
