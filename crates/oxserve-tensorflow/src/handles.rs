//! Owners for the C API's handles: each frees what it owns exactly once, in `Drop`.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_int};
use std::path::Path;
use std::sync::Arc;

use crate::api::{Api, TF_Buffer, TF_Graph, TF_Output, TF_Session, TF_Status, TF_TString, TF_Tensor};

/// DT_STRING's code.
const STRING: i32 = oxserve_core::DataType::Bytes.tensorflow_code();

/// A `TF_Status`; `check` turns a failed one into its message.
pub(crate) struct Status<'a> {
    api: &'a Api,
    raw: *mut TF_Status,
}

impl<'a> Status<'a> {
    pub(crate) fn new(api: &'a Api) -> Self {
        // SAFETY: TF_NewStatus has no preconditions and returns a fresh, owned status.
        let raw = unsafe { (api.TF_NewStatus)() };
        Status { api, raw }
    }

    pub(crate) fn raw(&self) -> *mut TF_Status {
        self.raw
    }

    /// Ok when the last call succeeded, else TensorFlow's message.
    pub(crate) fn check(&self) -> Result<(), String> {
        self.check_code().map_err(|(_, message)| message)
    }

    /// Ok when the last call succeeded, else TensorFlow's error code (`TF_Code`) and message.
    pub(crate) fn check_code(&self) -> Result<(), (i32, String)> {
        // SAFETY: `raw` is a live status owned by self.
        let code = unsafe { (self.api.TF_GetCode)(self.raw) };
        if code == 0 {
            return Ok(());
        }
        // SAFETY: TF_Message returns a NUL-terminated string owned by the status, valid until
        // the status changes; it is copied at once.
        let message = unsafe { CStr::from_ptr((self.api.TF_Message)(self.raw)) }
            .to_string_lossy()
            .into_owned();
        Err((code, message))
    }
}

impl Drop for Status<'_> {
    fn drop(&mut self) {
        // SAFETY: `raw` came from TF_NewStatus and is deleted once, here.
        unsafe { (self.api.TF_DeleteStatus)(self.raw) }
    }
}

/// A `TF_Buffer` TensorFlow fills (the MetaGraphDef of a load).
struct Buffer<'a> {
    api: &'a Api,
    raw: *mut TF_Buffer,
}

impl<'a> Buffer<'a> {
    fn new(api: &'a Api) -> Self {
        // SAFETY: TF_NewBuffer returns a fresh, empty, owned buffer.
        let raw = unsafe { (api.TF_NewBuffer)() };
        Buffer { api, raw }
    }

    fn to_vec(&self) -> Vec<u8> {
        // SAFETY: `raw` is a live buffer; TensorFlow set `data`/`length` to its own allocation
        // (or left them null/0).
        unsafe {
            let b = &*self.raw;
            if b.data.is_null() || b.length == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(b.data.cast::<u8>(), b.length).to_vec()
            }
        }
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        // SAFETY: `raw` came from TF_NewBuffer; TF_DeleteBuffer also frees the data with the
        // deallocator TensorFlow installed.
        unsafe { (self.api.TF_DeleteBuffer)(self.raw) }
    }
}

/// A loaded SavedModel: its graph and the session over it.
pub(crate) struct Session {
    api: Arc<Api>,
    graph: *mut TF_Graph,
    session: *mut TF_Session,
}

// SAFETY: a TF_Session may be run from several threads at once (tensorflow::Session::Run is
// thread-safe, and TF_SessionRun only takes the graph's own mutex to extend the session); the
// graph is not changed after load apart from that. Both are freed once, in Drop.
unsafe impl Send for Session {}
// SAFETY: as above; every method takes `&self` and is safe to call concurrently.
unsafe impl Sync for Session {}

impl Session {
    /// Loads a SavedModel directory with the given tags and a serialized `ConfigProto`;
    /// returns the session and the serialized MetaGraphDef of the loaded tags.
    pub(crate) fn load(
        api: Arc<Api>,
        export_dir: &Path,
        tags: &[String],
        config_proto: &[u8],
    ) -> Result<(Session, Vec<u8>), String> {
        let dir = CString::new(export_dir.as_os_str().as_encoded_bytes())
            .map_err(|_| "the model path contains a NUL byte".to_string())?;
        let tags: Vec<CString> = tags
            .iter()
            .map(|t| CString::new(t.as_str()).map_err(|_| format!("tag '{t}' contains a NUL byte")))
            .collect::<Result<_, _>>()?;
        let tag_ptrs: Vec<*const std::ffi::c_char> = tags.iter().map(|t| t.as_ptr()).collect();
        let status = Status::new(&api);
        // SAFETY: a fresh options object, freed below after the load copied what it needs.
        let options = unsafe { (api.TF_NewSessionOptions)() };
        if !config_proto.is_empty() {
            // SAFETY: the pointer and length describe `config_proto`, which outlives the call.
            unsafe {
                (api.TF_SetConfig)(
                    options,
                    config_proto.as_ptr().cast(),
                    config_proto.len(),
                    status.raw(),
                )
            };
            if let Err(e) = status.check() {
                // SAFETY: `options` is owned here and not used again.
                unsafe { (api.TF_DeleteSessionOptions)(options) };
                return Err(format!("invalid session configuration: {e}"));
            }
        }
        // SAFETY: a fresh graph; owned by the Session below, or freed on failure.
        let graph = unsafe { (api.TF_NewGraph)() };
        let meta = Buffer::new(&api);
        // SAFETY: every pointer is live for the call: options, the NUL-terminated directory and
        // tags (`tags` keeps the strings alive), the graph, the output buffer and the status.
        // A null run-options buffer is allowed.
        let session = unsafe {
            (api.TF_LoadSessionFromSavedModel)(
                options,
                std::ptr::null(),
                dir.as_ptr(),
                tag_ptrs.as_ptr(),
                tag_ptrs.len() as c_int,
                graph,
                meta.raw,
                status.raw(),
            )
        };
        // SAFETY: the load has copied the options; `options` is not used again.
        unsafe { (api.TF_DeleteSessionOptions)(options) };
        if let Err(e) = status.check() {
            if !session.is_null() {
                // SAFETY: a session returned despite the error is owned here; close and free it.
                unsafe {
                    (api.TF_CloseSession)(session, status.raw());
                    (api.TF_DeleteSession)(session, status.raw());
                }
            }
            // SAFETY: the graph is owned here and no session uses it any more.
            unsafe { (api.TF_DeleteGraph)(graph) };
            return Err(e);
        }
        if session.is_null() {
            // SAFETY: as above.
            unsafe { (api.TF_DeleteGraph)(graph) };
            return Err("TensorFlow returned no session".into());
        }
        let meta_graph = meta.to_vec();
        drop(meta);
        drop(status);
        Ok((Session { api, graph, session }, meta_graph))
    }

    pub(crate) fn api(&self) -> &Arc<Api> {
        &self.api
    }

    /// The graph endpoint of a tensor name (`op:index`, index 0 when omitted).
    pub(crate) fn endpoint(&self, tensor_name: &str) -> Result<Endpoint, String> {
        let (op, index) = match tensor_name.rsplit_once(':') {
            Some((op, idx)) => (
                op,
                idx.parse::<c_int>()
                    .map_err(|_| format!("tensor name '{tensor_name}' has an invalid output index"))?,
            ),
            None => (tensor_name, 0),
        };
        let c_op =
            CString::new(op).map_err(|_| format!("tensor name '{tensor_name}' contains a NUL byte"))?;
        // SAFETY: the graph is live (owned by self) and `c_op` is NUL-terminated.
        let oper = unsafe { (self.api.TF_GraphOperationByName)(self.graph, c_op.as_ptr()) };
        if oper.is_null() {
            return Err(format!(
                "the graph has no operation '{op}' (tensor '{tensor_name}')"
            ));
        }
        // SAFETY: `oper` is an operation of the live graph.
        let outputs = unsafe { (self.api.TF_OperationNumOutputs)(oper) };
        if index < 0 || index >= outputs {
            return Err(format!("operation '{op}' has no output {index}"));
        }
        Ok(Endpoint(TF_Output { oper, index }))
    }

    /// Runs the session: feeds `inputs` and fetches `outputs`.
    pub(crate) fn run(
        &self,
        feeds: &[(Endpoint, &OwnedTensor)],
        fetches: &[Endpoint],
    ) -> Result<Vec<OwnedTensor>, (i32, String)> {
        let inputs: Vec<TF_Output> = feeds.iter().map(|(e, _)| e.0).collect();
        let values: Vec<*mut TF_Tensor> = feeds.iter().map(|(_, t)| t.raw).collect();
        let outputs: Vec<TF_Output> = fetches.iter().map(|e| e.0).collect();
        let mut results: Vec<*mut TF_Tensor> = vec![std::ptr::null_mut(); outputs.len()];
        let status = Status::new(&self.api);
        // SAFETY: the session is live; the endpoint arrays hold operations of its graph; the
        // input tensors are live for the call (TF_SessionRun does not take ownership of them);
        // `results` has room for one tensor per fetch, which the call hands to us.
        unsafe {
            (self.api.TF_SessionRun)(
                self.session,
                std::ptr::null(),
                inputs.as_ptr(),
                values.as_ptr(),
                inputs.len() as c_int,
                outputs.as_ptr(),
                results.as_mut_ptr(),
                outputs.len() as c_int,
                std::ptr::null(),
                0,
                std::ptr::null_mut(),
                status.raw(),
            )
        };
        // Own whatever was returned first, so nothing leaks on error.
        let owned: Vec<Option<OwnedTensor>> = results
            .into_iter()
            .map(|raw| {
                (!raw.is_null()).then(|| OwnedTensor {
                    api: Arc::clone(&self.api),
                    raw,
                    our_strings: 0,
                })
            })
            .collect();
        status.check_code()?;
        owned
            .into_iter()
            .map(|t| t.ok_or_else(|| (13, "TensorFlow returned no tensor for an output".to_string())))
            .collect()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let status = Status::new(&self.api);
        // SAFETY: the session and graph are owned by self and freed once, session first (it
        // refers to the graph).
        unsafe {
            (self.api.TF_CloseSession)(self.session, status.raw());
            (self.api.TF_DeleteSession)(self.session, status.raw());
            (self.api.TF_DeleteGraph)(self.graph);
        }
    }
}

/// An operation output of a session's graph.
#[derive(Clone, Copy)]
pub(crate) struct Endpoint(TF_Output);

// SAFETY: an Endpoint is a pointer to an operation of a graph owned by a Session; it is only
// used with that session (instances hold the Arc<Session> next to their endpoints), and the
// graph's operations are immutable and never freed while the session lives.
unsafe impl Send for Endpoint {}
// SAFETY: as above.
unsafe impl Sync for Endpoint {}

/// A tensor owned by us: made by [`OwnedTensor::from_bytes`] / [`OwnedTensor::from_strings`],
/// or returned by a run.
pub(crate) struct OwnedTensor {
    api: Arc<Api>,
    raw: *mut TF_Tensor,
    /// String elements we initialised (TF_AllocateTensor's buffer does not destroy them).
    our_strings: usize,
}

// SAFETY: a TF_Tensor is a reference-counted buffer with no thread affinity; this owner frees
// it once. Shared access only reads it.
unsafe impl Send for OwnedTensor {}
// SAFETY: as above; `&OwnedTensor` only reads.
unsafe impl Sync for OwnedTensor {}

impl OwnedTensor {
    fn allocate(api: &Arc<Api>, dtype: i32, dims: &[i64], len: usize) -> Result<*mut TF_Tensor, String> {
        // SAFETY: `dims` is a live array of `dims.len()` dimensions; TensorFlow allocates `len`
        // bytes (aligned as it needs) and returns an owned tensor, or null.
        let raw = unsafe { (api.TF_AllocateTensor)(dtype, dims.as_ptr(), dims.len() as c_int, len) };
        if raw.is_null() {
            return Err(format!("TensorFlow could not allocate a tensor of {len} bytes"));
        }
        Ok(raw)
    }

    /// A fixed-size tensor with a copy of `bytes` (little-endian elements of `dtype`).
    pub(crate) fn from_bytes(api: &Arc<Api>, dtype: i32, dims: &[i64], bytes: &[u8]) -> Result<Self, String> {
        let raw = Self::allocate(api, dtype, dims, bytes.len())?;
        let tensor = OwnedTensor {
            api: Arc::clone(api),
            raw,
            our_strings: 0,
        };
        if !bytes.is_empty() {
            // SAFETY: TF_AllocateTensor gave a buffer of exactly `bytes.len()` bytes.
            unsafe {
                let data = (api.TF_TensorData)(raw).cast::<u8>();
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len());
            }
        }
        Ok(tensor)
    }

    /// A DT_STRING tensor holding copies of `items`.
    pub(crate) fn from_strings(api: &Arc<Api>, dims: &[i64], items: &[bytes::Bytes]) -> Result<Self, String> {
        let len = items.len() * std::mem::size_of::<TF_TString>();
        let raw = Self::allocate(api, STRING, dims, len)?;
        let mut tensor = OwnedTensor {
            api: Arc::clone(api),
            raw,
            our_strings: 0,
        };
        // SAFETY: the buffer holds `items.len()` TF_TString slots (TF_AllocateTensor aligns
        // it at least as much as TF_TString needs); each is initialised before it is
        // written, and counted so Drop deallocates exactly the initialised ones.
        unsafe {
            let slots = (api.TF_TensorData)(raw).cast::<TF_TString>();
            for (i, item) in items.iter().enumerate() {
                let slot = slots.add(i);
                (api.TF_StringInit)(slot);
                tensor.our_strings = i + 1;
                (api.TF_StringCopy)(slot, item.as_ptr().cast(), item.len());
            }
        }
        Ok(tensor)
    }

    pub(crate) fn dtype(&self) -> i32 {
        // SAFETY: `raw` is a live tensor.
        unsafe { (self.api.TF_TensorType)(self.raw) }
    }

    pub(crate) fn dims(&self) -> Vec<i64> {
        // SAFETY: `raw` is a live tensor; dims are read for indices below TF_NumDims.
        unsafe {
            let n = (self.api.TF_NumDims)(self.raw);
            (0..n).map(|i| (self.api.TF_Dim)(self.raw, i)).collect()
        }
    }

    /// The tensor's bytes (fixed-size types).
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: TF_TensorData/TF_TensorByteSize describe the tensor's buffer, which lives as
        // long as self and is not written while shared.
        unsafe {
            let len = (self.api.TF_TensorByteSize)(self.raw);
            let data = (self.api.TF_TensorData)(self.raw);
            if len == 0 || data.is_null() {
                &[]
            } else {
                std::slice::from_raw_parts(data.cast::<u8>(), len)
            }
        }
    }

    /// Copies of the elements of a DT_STRING tensor (`count` elements).
    pub(crate) fn strings(&self, count: usize) -> Result<Vec<bytes::Bytes>, String> {
        if self.dtype() != STRING {
            return Err("not a string tensor".into());
        }
        // SAFETY: (as in `bytes`) the buffer is live while self is.
        let len = unsafe { (self.api.TF_TensorByteSize)(self.raw) };
        if count.checked_mul(std::mem::size_of::<TF_TString>()) != Some(len) {
            return Err(format!(
                "string tensor of {len} bytes does not hold {count} elements"
            ));
        }
        // SAFETY: the buffer holds `count` initialised TF_TString elements (checked above);
        // each element's data pointer and size describe bytes owned by the element.
        unsafe {
            let slots = (self.api.TF_TensorData)(self.raw).cast::<TF_TString>();
            Ok((0..count)
                .map(|i| {
                    let slot = slots.add(i);
                    let size = (self.api.TF_StringGetSize)(slot);
                    let data = (self.api.TF_StringGetDataPointer)(slot);
                    if size == 0 || data.is_null() {
                        bytes::Bytes::new()
                    } else {
                        bytes::Bytes::copy_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), size))
                    }
                })
                .collect())
        }
    }
}

impl Drop for OwnedTensor {
    fn drop(&mut self) {
        // SAFETY: the first `our_strings` slots were initialised by from_strings and are
        // deallocated once; then the tensor, owned by self, is deleted once.
        unsafe {
            if self.our_strings > 0 {
                let slots = (self.api.TF_TensorData)(self.raw).cast::<TF_TString>();
                for i in 0..self.our_strings {
                    (self.api.TF_StringDealloc)(slots.add(i));
                }
            }
            (self.api.TF_DeleteTensor)(self.raw);
        }
    }
}

/// Output bytes that keep the TensorFlow tensor alive instead of copying it.
pub(crate) struct TensorBytes(pub(crate) OwnedTensor);

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}
