//! The TensorFlow C API functions the engine calls, resolved from the library at run time.
//!
//! Only declarations live here; the safe wrappers are in [`crate::handles`]. Types are the
//! C API's: opaque handles as zero-sized `#[repr(C)]` structs, `TF_Buffer`, `TF_Output` and
//! `TF_TString` with the layouts of `c_api.h`, `tf_buffer.h` and `tf_tstring.h`.
#![allow(unsafe_code)]
#![allow(non_camel_case_types, non_snake_case)]

use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};

macro_rules! opaque {
    ($($name:ident),*) => {$(
        #[repr(C)]
        pub struct $name {
            _private: [u8; 0],
        }
    )*};
}
opaque!(
    TF_Status,
    TF_Graph,
    TF_SessionOptions,
    TF_Session,
    TF_Operation,
    TF_Tensor
);

#[repr(C)]
pub struct TF_Buffer {
    pub data: *const c_void,
    pub length: usize,
    pub data_deallocator: Option<unsafe extern "C" fn(*mut c_void, usize)>,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TF_Output {
    pub oper: *mut TF_Operation,
    pub index: c_int,
}

/// `TF_TString`: 24 bytes, 8-byte aligned (a union of the small/large/offset/view forms;
/// `static_assert(sizeof(TF_TString) == 24)` in tf_tstring.h).
#[repr(C, align(8))]
pub struct TF_TString {
    _raw: [u8; 24],
}

macro_rules! api {
    ($($name:ident : fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// The resolved C API. Holds the library open for as long as it lives; the engine keeps
        /// one for the whole process (TensorFlow cannot be unloaded safely).
        pub struct Api {
            $(pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
            pub library: PathBuf,
            pub version: String,
            _lib: libloading::Library,
        }

        impl Api {
            /// Opens the library and resolves every function, or says which one is missing.
            pub fn load(path: &Path) -> Result<Api, String> {
                // SAFETY: opening a library runs its initialisers; libtensorflow_cc is a
                // well-behaved shared library whose initialisers only register kernels and ops.
                let lib = unsafe { libloading::Library::new(path) }
                    .map_err(|e| format!("cannot open the TensorFlow library {}: {e}", path.display()))?;
                $(
                    // SAFETY: the symbol is declared with the C signature of the C API header;
                    // the pointer stays valid while `_lib` keeps the library open.
                    let $name = unsafe {
                        *lib.get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(concat!(stringify!($name), "\0").as_bytes())
                            .map_err(|e| format!(
                                "the library {} is not TensorFlow's C API (no {}): {e}",
                                path.display(), stringify!($name)
                            ))?
                    };
                )*
                let mut api = Api { $($name,)* library: path.to_path_buf(), version: String::new(), _lib: lib };
                // SAFETY: TF_Version returns a static NUL-terminated string.
                api.version = unsafe { std::ffi::CStr::from_ptr((api.TF_Version)()) }
                    .to_string_lossy()
                    .into_owned();
                Ok(api)
            }
        }
    };
}

api! {
    TF_Version: fn() -> *const c_char;
    TF_NewStatus: fn() -> *mut TF_Status;
    TF_DeleteStatus: fn(*mut TF_Status);
    TF_GetCode: fn(*const TF_Status) -> c_int;
    TF_Message: fn(*const TF_Status) -> *const c_char;
    TF_NewGraph: fn() -> *mut TF_Graph;
    TF_DeleteGraph: fn(*mut TF_Graph);
    TF_GraphOperationByName: fn(*mut TF_Graph, *const c_char) -> *mut TF_Operation;
    TF_OperationNumOutputs: fn(*mut TF_Operation) -> c_int;
    TF_NewSessionOptions: fn() -> *mut TF_SessionOptions;
    TF_DeleteSessionOptions: fn(*mut TF_SessionOptions);
    TF_SetConfig: fn(*mut TF_SessionOptions, *const c_void, usize, *mut TF_Status);
    TF_NewBuffer: fn() -> *mut TF_Buffer;
    TF_DeleteBuffer: fn(*mut TF_Buffer);
    TF_LoadSessionFromSavedModel: fn(
        *const TF_SessionOptions, *const TF_Buffer, *const c_char, *const *const c_char, c_int,
        *mut TF_Graph, *mut TF_Buffer, *mut TF_Status
    ) -> *mut TF_Session;
    TF_SessionRun: fn(
        *mut TF_Session, *const TF_Buffer, *const TF_Output, *const *mut TF_Tensor, c_int,
        *const TF_Output, *mut *mut TF_Tensor, c_int, *const *const TF_Operation, c_int,
        *mut TF_Buffer, *mut TF_Status
    );
    TF_CloseSession: fn(*mut TF_Session, *mut TF_Status);
    TF_DeleteSession: fn(*mut TF_Session, *mut TF_Status);
    TF_AllocateTensor: fn(c_int, *const i64, c_int, usize) -> *mut TF_Tensor;
    TF_DeleteTensor: fn(*mut TF_Tensor);
    TF_TensorType: fn(*const TF_Tensor) -> c_int;
    TF_NumDims: fn(*const TF_Tensor) -> c_int;
    TF_Dim: fn(*const TF_Tensor, c_int) -> i64;
    TF_TensorByteSize: fn(*const TF_Tensor) -> usize;
    TF_TensorData: fn(*const TF_Tensor) -> *mut c_void;
    TF_StringInit: fn(*mut TF_TString);
    TF_StringCopy: fn(*mut TF_TString, *const c_char, usize);
    TF_StringGetDataPointer: fn(*const TF_TString) -> *const c_char;
    TF_StringGetSize: fn(*const TF_TString) -> usize;
    TF_StringDealloc: fn(*mut TF_TString);
}
