//! Triton's system shared-memory extension. A client on the same host puts tensor bytes in a
//! POSIX shared-memory object (`/dev/shm/<key>`), registers a region of it under a name, and
//! names the region in its requests instead of sending the bytes; outputs can be written back
//! the same way. For large tensors (image batches) this removes the transfer and the copies
//! through the network stack, which otherwise cost more than the model on a busy host.
//!
//! One registry is shared by the HTTP and gRPC front-ends, as in Triton.
//!
//! Nothing a client puts in shared memory is trusted. Registration is admitted by a
//! [`RegistrationPolicy`] (loopback clients, object names under a prefix), and only
//! floating-point inputs reach the engine as views of the client's pages; everything else is
//! copied first ([`may_stay_a_view`]), so a client rewriting its object mid-inference can change
//! its answer but not what the server and the engines checked.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::net::IpAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use oxserve_core::{DataType, Error, InferResponse, ParamValue, Parameters, Result};

pub use admission::{DEFAULT_KEY_PREFIX, RegistrationPolicy, admit_registration, is_loopback};
use mapping::Mapping;

mod admission;
mod mapping;

/// Where POSIX shared-memory objects live on Linux (what `shm_open` uses).
const SHM_DIR: &str = "/dev/shm";

/// Regions kept at most: each holds its object open (one file descriptor), and a client must
/// not be able to exhaust the descriptors the server needs for connections.
pub const MAX_REGIONS: usize = 256;

/// The tensor parameters naming a region: Triton's names, the same over HTTP and gRPC.
pub const REGION_PARAM: &str = "shared_memory_region";
pub const OFFSET_PARAM: &str = "shared_memory_offset";
pub const BYTE_SIZE_PARAM: &str = "shared_memory_byte_size";

/// A registered region, as the status endpoints report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionStatus {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// Where a tensor's bytes are: `byte_size` bytes at `offset` within a registered region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmRef {
    pub region: String,
    pub offset: usize,
    pub byte_size: usize,
}

impl ShmRef {
    /// Triton's tensor parameters naming this place: the inverse of [`take_shm_ref`].
    pub fn params(&self) -> Parameters {
        let mut params = Parameters::new();
        params.insert(REGION_PARAM.into(), ParamValue::String(self.region.clone()));
        params.insert(BYTE_SIZE_PARAM.into(), ParamValue::Int(self.byte_size as i64));
        if self.offset != 0 {
            params.insert(OFFSET_PARAM.into(), ParamValue::Int(self.offset as i64));
        }
        params
    }
}

/// Outputs a request asked to have written into shared memory, by output name.
pub type SharedMemoryOutputs = Vec<(String, ShmRef)>;

/// The regions a request's inputs are views of ([`SharedMemoryRegistry::input`]), kept until
/// its response is sent so the front-end can tell whether the client shrank an object under
/// the engine's read ([`SharedMemoryInputs::check`]).
#[derive(Debug, Default)]
pub struct SharedMemoryInputs(Vec<Arc<Region>>);

impl SharedMemoryInputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// An error if any of the request's input regions was poisoned: part of what the engine
    /// read was zeros standing in for bytes the client removed, so the result is not its answer.
    pub fn check(&self) -> Result<()> {
        match self.0.iter().find(|region| region.poisoned()) {
            Some(region) => Err(region.poisoned_error()),
            None => Ok(()),
        }
    }
}

/// The registered system shared-memory regions of this server.
#[derive(Debug)]
pub struct SharedMemoryRegistry {
    regions: RwLock<BTreeMap<String, Arc<Region>>>,
    /// False when the operator turned the extension off: nothing can be registered.
    enabled: bool,
    /// Who may register which objects.
    policy: RegistrationPolicy,
}

impl Default for SharedMemoryRegistry {
    fn default() -> Self {
        SharedMemoryRegistry {
            regions: RwLock::default(),
            enabled: true,
            policy: RegistrationPolicy::default(),
        }
    }
}

impl SharedMemoryRegistry {
    /// A registry with the default [`RegistrationPolicy`] (loopback clients, keys under
    /// [`DEFAULT_KEY_PREFIX`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry that admits registrations by `policy`.
    pub fn with_policy(policy: RegistrationPolicy) -> Self {
        SharedMemoryRegistry {
            policy,
            ..Self::default()
        }
    }

    /// A registry that refuses every registration (`--allow-shared-memory false`).
    pub fn disabled() -> Self {
        SharedMemoryRegistry {
            enabled: false,
            ..Self::default()
        }
    }

    fn refuse_if_disabled(&self) -> Result<()> {
        if self.enabled {
            Ok(())
        } else {
            Err(Error::unsupported(
                "system shared memory is disabled on this server (--allow-shared-memory false)",
            ))
        }
    }

    /// Registers `byte_size` bytes at `offset` of the shared-memory object `key` under `name`,
    /// for a client at `peer` (`None`: the transport did not say, treated as remote), if the
    /// registry's [`RegistrationPolicy`] admits it (PERMISSION_DENIED with the reason if not).
    pub fn register(
        &self,
        peer: Option<IpAddr>,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<()> {
        self.refuse_if_disabled()?;
        // Before the object is opened: a refused client learns nothing about what exists.
        admit_registration(&self.policy, peer, key)?;
        if name.is_empty() {
            return Err(Error::invalid("a shared memory region needs a name"));
        }
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        if regions.contains_key(name) {
            return Err(Error::invalid(format!(
                "shared memory region '{name}' already in manager"
            )));
        }
        if regions.len() >= MAX_REGIONS {
            return Err(Error::invalid(format!(
                "cannot register shared memory region '{name}': {MAX_REGIONS} regions are \
                 registered, the most this server keeps; unregister some first"
            )));
        }
        let region = Region::open(name, key, offset, byte_size)?;
        regions.insert(name.to_string(), Arc::new(region));
        Ok(())
    }

    /// Forgets a region. Like Triton, an unknown name is not an error. Requests already using
    /// the region keep it open until they finish.
    pub fn unregister(&self, name: &str) {
        self.regions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    pub fn unregister_all(&self) {
        self.regions.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Every region (no name), or the named one (NOT_FOUND if it is not registered).
    pub fn status(&self, name: Option<&str>) -> Result<Vec<RegionStatus>> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        match name {
            None => Ok(regions.values().map(|r| r.status()).collect()),
            Some(name) => regions
                .get(name)
                .map(|r| vec![r.status()])
                .ok_or_else(|| not_registered(name)),
        }
    }

    fn region(&self, name: &str) -> Result<Arc<Region>> {
        self.refuse_if_disabled()?;
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            // Triton's words where a request names a region (its status endpoint says
            // "system shared memory region").
            .ok_or_else(|| Error::not_found(format!("Unable to find shared memory region: '{name}'")))
    }

    /// A copy of the bytes a tensor's parameters point at: for BYTES inputs, which the server
    /// parses, so what it checked cannot change under it.
    fn read(&self, at: &ShmRef) -> Result<Bytes> {
        let region = self.region(&at.region)?;
        Ok(Bytes::from(region.read(at.offset, at.byte_size)?))
    }

    /// The bytes an input's parameters point at (`datatype` is the wire name): a view of the
    /// region's mapping for floating-point inputs, a private copy for every other type (see
    /// [`may_stay_a_view`]). Whatever checks values (BOOL bytes, indices, shapes, BYTES
    /// lengths) then checks the copy, which the client can no longer change.
    pub fn input(&self, at: &ShmRef, datatype: &str, inputs: &mut SharedMemoryInputs) -> Result<Bytes> {
        match DataType::from_wire_name(datatype) {
            Some(dt) if may_stay_a_view(dt) => self.view(at, inputs),
            // Unknown names are copied too; the caller rejects them anyway.
            _ => self.read(at),
        }
    }

    /// The bytes a floating-point input's parameters point at, as a view of the region's mapping
    /// (no copy; as in Triton, the client must leave them alone until the response arrives),
    /// or a copy where the region could not be mapped. `inputs` keeps the region for
    /// [`SharedMemoryInputs::check`].
    fn view(&self, at: &ShmRef, inputs: &mut SharedMemoryInputs) -> Result<Bytes> {
        let region = self.region(&at.region)?;
        let bytes = region.view(at.offset, at.byte_size)?;
        inputs.0.push(region);
        Ok(bytes)
    }

    /// Writes an output into the place `at` names, which must be large enough to hold it.
    pub fn write(&self, output: &str, at: &ShmRef, data: &[u8]) -> Result<()> {
        if data.len() > at.byte_size {
            return Err(Error::invalid(format!(
                "shared memory size specified with the request for output '{output}' ({} bytes) \
                 should be at least {} bytes to hold the results",
                at.byte_size,
                data.len()
            )));
        }
        self.region(&at.region)?.write(at.offset, at.byte_size, data)
    }

    /// Writes each output of `response` named in `outputs` into its place (Triton's binary
    /// form); the protocol then answers those outputs without data.
    pub fn write_outputs(&self, response: &InferResponse, outputs: &SharedMemoryOutputs) -> Result<()> {
        for (name, at) in outputs {
            if let Some(t) = response.outputs.iter().find(|t| &t.name == name) {
                self.write(name, at, &t.to_wire_bytes())?;
            }
        }
        Ok(())
    }
}

/// Whether an input of type `dt` may reach the engine as a live view of the client's pages,
/// which the client can rewrite while the engine runs.
///
/// Only floating-point values: a float that changes mid-inference changes only the answer the
/// client gets. Every other type can carry a value an engine checks and then reads again:
/// an integer used as an index (ONNX Runtime's Gather checks every index in one pass and reads
/// them in another: rewritten in between, an out-of-bounds read), a shape or a size; a BOOL
/// that must be 0 or 1 (any other byte in a Rust `bool` is undefined behaviour); BYTES whose
/// lengths the server parses. Those are copied once, and every check runs on the copy.
pub fn may_stay_a_view(dt: DataType) -> bool {
    match dt {
        DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64 => true,
        DataType::Bool
        | DataType::U8
        | DataType::U16
        | DataType::U32
        | DataType::U64
        | DataType::I8
        | DataType::I16
        | DataType::I32
        | DataType::I64
        | DataType::Bytes => false,
    }
}

fn not_registered(name: &str) -> Error {
    Error::not_found(format!("Unable to find system shared memory region: '{name}'"))
}

/// The file behind a key. `shm_open` ignores leading slashes and refuses any other slash, so
/// a key can only name an object directly inside /dev/shm.
fn object_path(key: &str) -> Result<PathBuf> {
    let name = key.trim_start_matches('/');
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
        return Err(Error::invalid(format!(
            "Unable to open shared memory region: '{key}' is not a valid shared memory key"
        )));
    }
    Ok(PathBuf::from(SHM_DIR).join(name))
}

fn open_object(key: &str) -> Result<File> {
    let path = object_path(key)?;
    OpenOptions::new()
        .read(true)
        .write(true)
        // As `shm_open` does: a symbolic link in /dev/shm must not lead the server to a file
        // elsewhere that it would then read inputs from and write outputs into.
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| Error::invalid(format!("Unable to open shared memory region: '{key}': {e}")))
}

/// Takes Triton's shared-memory parameters out of a tensor's parameters: `None` when the
/// tensor does not use shared memory. `what` is "input" or "output", for the messages.
pub fn take_shm_ref(what: &str, tensor: &str, params: &mut Parameters) -> Result<Option<ShmRef>> {
    let region = params.remove(REGION_PARAM);
    let offset = params.remove(OFFSET_PARAM);
    let byte_size = params.remove(BYTE_SIZE_PARAM);
    let Some(region) = region else {
        if let Some(key) = [(OFFSET_PARAM, &offset), (BYTE_SIZE_PARAM, &byte_size)]
            .iter()
            .find_map(|(k, v)| v.is_some().then_some(*k))
        {
            return Err(Error::invalid(format!(
                "'{key}' can not be specified without '{REGION_PARAM}' parameter for {what} '{tensor}'"
            )));
        }
        return Ok(None);
    };
    let ParamValue::String(region) = region else {
        return Err(Error::invalid(format!(
            "invalid value type for '{REGION_PARAM}' parameter for {what} '{tensor}', expected a string"
        )));
    };
    let non_negative = |key: &str, value: &ParamValue| {
        // Up to u64::MAX (JSON numbers past i64::MAX arrive unsigned), so that a huge offset
        // is refused by the region's checks in Triton's words, not as a malformed number.
        let number = match value {
            ParamValue::Uint(v) => Some(*v),
            other => other.as_i64().and_then(|v| u64::try_from(v).ok()),
        };
        number.and_then(|v| usize::try_from(v).ok()).ok_or_else(|| {
            Error::invalid(format!(
                "invalid value for '{key}' parameter for {what} '{tensor}', expected a non-negative integer"
            ))
        })
    };
    let offset = match &offset {
        Some(v) => non_negative(OFFSET_PARAM, v)?,
        None => 0,
    };
    let Some(byte_size) = &byte_size else {
        return Err(Error::invalid(format!(
            "'{BYTE_SIZE_PARAM}' must be specified along with '{REGION_PARAM}' parameter for {what} '{tensor}'"
        )));
    };
    let byte_size = non_negative(BYTE_SIZE_PARAM, byte_size)?;
    Ok(Some(ShmRef {
        region,
        offset,
        byte_size,
    }))
}

/// Where an output is to be written, if the request put it in shared memory.
pub fn place_of<'a>(outputs: &'a SharedMemoryOutputs, output: &str) -> Option<&'a ShmRef> {
    outputs.iter().find(|(n, _)| n == output).map(|(_, at)| at)
}

/// Triton's rule for a requested output: shared memory and classification exclude each other.
pub fn check_output_place(output: &str, at: Option<&ShmRef>, classification: Option<usize>) -> Result<()> {
    if at.is_some() && classification.is_some() {
        return Err(Error::invalid(format!(
            "output '{output}' can't set both '{REGION_PARAM}' and 'classification'"
        )));
    }
    Ok(())
}

/// The parameters a response output carries when its data went to shared memory (Triton's
/// HTTP and gRPC front-ends send the same three back).
pub fn output_params(at: &ShmRef, written: usize) -> Parameters {
    let mut params = at.params();
    params.insert(BYTE_SIZE_PARAM.into(), ParamValue::Int(written as i64));
    params
}

/// A registered region: the client's object, opened once and mapped read-only so
/// floating-point inputs reach the engine without a copy (see [`mapping`] for what happens
/// when the client shrinks the object under a read). Outputs, inputs of every other type and
/// regions that could not be mapped use positioned I/O (`pwrite`/`pread`), which on a shrunk
/// object just comes up short.
#[derive(Debug)]
struct Region {
    /// The name it is registered under, for messages.
    name: String,
    key: String,
    offset: u64,
    byte_size: usize,
    file: File,
    mapping: Option<Arc<Mapping>>,
}

/// A view of part of a mapping, as the owner of a `Bytes`: the mapping stays until the last
/// view of it is dropped, even after the region is unregistered.
struct MappedInput {
    mapping: Arc<Mapping>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for MappedInput {
    fn as_ref(&self) -> &[u8] {
        &self.mapping.bytes()[self.offset..self.offset + self.len]
    }
}

impl Region {
    fn open(name: &str, key: &str, offset: u64, byte_size: u64) -> Result<Region> {
        // Triton's words ("...: invalid args"), which its clients and tests match, then why.
        let invalid = |why: String| {
            Error::invalid(format!(
                "failed to register shared memory region '{name}': invalid args: {why}"
            ))
        };
        if byte_size == 0 {
            return Err(invalid("byte_size must be greater than 0".into()));
        }
        let byte_size =
            usize::try_from(byte_size).map_err(|_| invalid(format!("byte_size {byte_size} is too large")))?;
        let file = open_object(key)?;
        let object_len = file
            .metadata()
            .map_err(|e| invalid(format!("cannot read the size of '{key}': {e}")))?
            .len();
        let end = offset.checked_add(byte_size as u64);
        if end.is_none_or(|end| end > object_len) {
            return Err(invalid(format!(
                "offset {offset} + byte_size {byte_size} goes past the end of '{key}' ({object_len} bytes)"
            )));
        }
        let mapping = Mapping::new(&file, offset, byte_size).map(Arc::new);
        Ok(Region {
            name: name.to_string(),
            key: key.to_string(),
            offset,
            byte_size,
            file,
            mapping,
        })
    }

    fn poisoned(&self) -> bool {
        self.mapping.as_ref().is_some_and(|m| m.poisoned())
    }

    fn poisoned_error(&self) -> Error {
        Error::invalid(format!(
            "shared memory region '{}': '{}' was made smaller than the registered region \
             while the server was reading it; register the region again",
            self.name, self.key
        ))
    }

    fn status(&self) -> RegionStatus {
        RegionStatus {
            name: self.name.clone(),
            key: self.key.clone(),
            offset: self.offset,
            byte_size: self.byte_size as u64,
        }
    }

    /// Triton's checks of a tensor's offset and size against the region; the position of
    /// `offset` in the object.
    fn position(&self, offset: usize, len: usize) -> Result<u64> {
        let name = &self.name;
        if offset >= self.byte_size {
            return Err(Error::invalid(format!(
                "Invalid offset for shared memory region: '{name}'"
            )));
        }
        match offset.checked_add(len) {
            None => {
                return Err(Error::invalid(format!(
                    "Integer overflow detected: byte_size ({len}) + offset ({offset}) exceeds maximum \
                     value ({}) for region '{name}'",
                    usize::MAX
                )));
            }
            Some(end) if end > self.byte_size => {
                return Err(Error::invalid(format!(
                    "Invalid offset + byte size for shared memory region: '{name}'"
                )));
            }
            Some(_) => {}
        }
        Ok(self.offset + offset as u64)
    }

    fn shrunk(&self, e: &std::io::Error) -> Error {
        let now = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        Error::invalid(format!(
            "shared memory region '{}': cannot access '{}' ({e}); the object is now {now} \
             bytes, smaller than the registered region",
            self.name, self.key
        ))
    }

    /// An error unless the object (which the client may have shrunk) still reaches `end`.
    fn check_object_reaches(&self, end: u64) -> Result<()> {
        let now = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        if now < end {
            return Err(self.shrunk(&std::io::Error::from(std::io::ErrorKind::UnexpectedEof)));
        }
        Ok(())
    }

    /// The `len` bytes at `offset` in the region, as a view of the mapping when there is one.
    fn view(&self, offset: usize, len: usize) -> Result<Bytes> {
        let Some(mapping) = &self.mapping else {
            return self.read(offset, len).map(Bytes::from);
        };
        let position = self.position(offset, len)?;
        if mapping.poisoned() {
            return Err(self.poisoned_error());
        }
        // An object the client already shrank is an error now, not zeros later.
        self.check_object_reaches(position + len as u64)?;
        Ok(Bytes::from_owner(MappedInput {
            mapping: mapping.clone(),
            offset,
            len,
        }))
    }

    /// A copy of the `len` bytes at `offset` in the region.
    fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let position = self.position(offset, len)?;
        // Read into uninitialised capacity: the allocator hands back reused memory for large
        // tensors, and zeroing it first (as `read_exact_at` needs) was a second pass over it.
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let at = position + out.len() as u64;
            match rustix::io::pread(&self.file, rustix::buffer::spare_capacity(&mut out), at) {
                Ok(0) => {
                    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Err(self.shrunk(&eof));
                }
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(self.shrunk(&e.into())),
            }
        }
        // The spare capacity may exceed `len`; bytes read past it are not the tensor's.
        out.truncate(len);
        Ok(out)
    }

    /// Writes `data` at `offset` in the region, where the request declared `capacity` bytes.
    fn write(&self, offset: usize, capacity: usize, data: &[u8]) -> Result<()> {
        let position = self.position(offset, capacity)?;
        // Writing past the end would grow the client's object instead of failing.
        self.check_object_reaches(position + data.len() as u64)?;
        self.file
            .write_all_at(data, position)
            .map_err(|e| self.shrunk(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client on the loopback interface.
    const LOCAL: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    /// A shared-memory object of `len` bytes, removed when dropped.
    struct Object(PathBuf, String);

    impl Object {
        fn new(len: usize) -> Object {
            let key = format!("/oxserve-test-{}-{}", std::process::id(), rand_suffix());
            let path = object_path(&key).expect("valid key");
            std::fs::write(&path, vec![0u8; len]).expect("create shm object");
            Object(path, key)
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    fn at(region: &str, offset: usize, byte_size: usize) -> ShmRef {
        ShmRef {
            region: region.into(),
            offset,
            byte_size,
        }
    }

    #[test]
    fn write_then_read_through_a_region_at_an_offset() {
        let obj = Object::new(4096 + 64);
        let shm = SharedMemoryRegistry::new();
        // A region that starts at an offset that is not page-aligned.
        shm.register(LOCAL, "r", &obj.1, 100, 256).unwrap();
        shm.write("out", &at("r", 8, 16), &[7u8; 16]).unwrap();
        assert_eq!(shm.read(&at("r", 8, 16)).unwrap().as_ref(), &[7u8; 16]);
        // The bytes landed at 100 + 8 in the object.
        let file = std::fs::read(&obj.0).unwrap();
        assert_eq!(&file[108..124], &[7u8; 16]);
        assert_eq!(
            shm.status(None).unwrap(),
            vec![RegionStatus {
                name: "r".into(),
                key: obj.1.clone(),
                offset: 100,
                byte_size: 256
            }]
        );
    }

    #[test]
    fn bad_registrations_are_refused() {
        let obj = Object::new(1024);
        // Any key is admitted, so what is checked here is the object itself.
        let shm = SharedMemoryRegistry::with_policy(RegistrationPolicy::open());
        assert!(
            shm.register(LOCAL, "r", &obj.1, 1000, 100).is_err(),
            "past the end"
        );
        assert!(shm.register(LOCAL, "r", &obj.1, 0, 0).is_err(), "empty");
        assert!(shm.register(LOCAL, "r", "/no-such-oxserve-object", 0, 8).is_err());
        assert!(
            shm.register(LOCAL, "r", "/../etc/passwd", 0, 8).is_err(),
            "escapes /dev/shm"
        );
        // A symbolic link in /dev/shm to a file elsewhere is refused, as shm_open refuses it.
        let elsewhere = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(elsewhere.path(), [0u8; 64]).unwrap();
        let link = format!("/oxserve-test-link-{}-{}", std::process::id(), rand_suffix());
        let link_path = object_path(&link).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &link_path).unwrap();
        let refused = shm.register(LOCAL, "r", &link, 0, 8);
        let _ = std::fs::remove_file(&link_path);
        assert!(refused.is_err(), "followed a symbolic link out of /dev/shm");
        shm.register(LOCAL, "r", &obj.1, 0, 1024).unwrap();
        let e = shm.register(LOCAL, "r", &obj.1, 0, 8).unwrap_err();
        assert!(e.message().contains("already in manager"), "{e:?}");
        assert_eq!(
            shm.status(Some("nope")).unwrap_err().kind(),
            oxserve_core::ErrorKind::NotFound
        );
        shm.unregister("nope");
        shm.unregister("r");
        assert!(shm.status(None).unwrap().is_empty());
    }

    #[test]
    fn accesses_outside_the_region_or_the_object_are_errors() {
        let obj = Object::new(1024);
        let shm = SharedMemoryRegistry::new();
        shm.register(LOCAL, "r", &obj.1, 0, 1024).unwrap();
        assert!(shm.read(&at("r", 1024, 1)).is_err());
        assert!(shm.read(&at("r", 1000, 100)).is_err());
        assert!(shm.read(&at("r", usize::MAX, 2)).is_err());
        assert!(shm.write("o", &at("r", 0, 4), &[0u8; 8]).is_err(), "too small");
        // The client shrinks the object after registering: an error, not SIGBUS; also when
        // only the tail of the tensor is gone (a short read, then end of file).
        let shrink = |len: u64| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&obj.0)
                .unwrap()
                .set_len(len)
                .unwrap()
        };
        for len in [540, 10] {
            shrink(len);
            let e = shm.read(&at("r", 512, 64)).unwrap_err();
            assert!(
                e.message().contains("smaller than the registered region"),
                "{len}: {e:?}"
            );
            let e = shm
                .view(&at("r", 512, 64), &mut SharedMemoryInputs::new())
                .unwrap_err();
            assert!(
                e.message().contains("smaller than the registered region"),
                "{len}: {e:?}"
            );
        }
        assert_eq!(
            shm.read(&at("r", 0, 10)).unwrap().len(),
            10,
            "what is left still reads"
        );
        assert!(shm.write("o", &at("r", 512, 64), &[1u8; 64]).is_err());
    }

    #[test]
    fn unregistering_keeps_the_object_of_requests_in_flight() {
        let obj = Object::new(64);
        let shm = SharedMemoryRegistry::new();
        shm.register(LOCAL, "r", &obj.1, 0, 64).unwrap();
        let held = shm.region("r").unwrap();
        shm.write("o", &at("r", 8, 4), &[5u8; 4]).unwrap();
        let view = shm.view(&at("r", 8, 4), &mut SharedMemoryInputs::new()).unwrap();
        shm.unregister_all();
        assert!(shm.read(&at("r", 0, 4)).is_err());
        assert_eq!(held.read(0, 4).unwrap(), vec![0u8; 4]);
        drop(held);
        assert_eq!(view.as_ref(), &[5u8; 4], "the mapping outlives the region");
    }

    #[test]
    fn fixed_size_inputs_are_views_of_the_region_without_a_copy() {
        let obj = Object::new(8192);
        let shm = SharedMemoryRegistry::new();
        shm.register(LOCAL, "r", &obj.1, 0, 8192).unwrap();
        let mut inputs = SharedMemoryInputs::new();
        let a = shm.view(&at("r", 4096, 16), &mut inputs).unwrap();
        let b = shm.view(&at("r", 4096, 16), &mut inputs).unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr(), "both point into the one mapping");
        // What the client writes afterwards shows through: nothing was copied.
        shm.write("o", &at("r", 4096, 16), &[3u8; 16]).unwrap();
        assert_eq!(a.as_ref(), &[3u8; 16]);
        inputs.check().unwrap();
    }

    #[test]
    fn only_floating_point_inputs_stay_views_every_other_type_is_a_private_copy() {
        let obj = Object::new(4096);
        let shm = SharedMemoryRegistry::new();
        shm.register(LOCAL, "r", &obj.1, 0, 4096).unwrap();
        let place = at("r", 64, 16);
        let mut names: Vec<&str> = DataType::ALL.iter().map(|dt| dt.wire_name()).collect();
        names.push("NOT_A_TYPE");
        for name in names {
            shm.write("o", &place, &[1u8; 16]).unwrap();
            let mut inputs = SharedMemoryInputs::new();
            let got = shm.input(&place, name, &mut inputs).unwrap();
            assert_eq!(got.as_ref(), &[1u8; 16], "{name}");
            // The client rewrites its bytes while the engine holds the tensor.
            shm.write("o", &place, &[2u8; 16]).unwrap();
            let float = matches!(name, "FP16" | "BF16" | "FP32" | "FP64");
            if float {
                assert_eq!(got.as_ref(), &[2u8; 16], "{name}: a view shows the rewrite");
                assert_eq!(inputs.0.len(), 1, "{name}: the view's region is kept for check()");
            } else {
                assert_eq!(got.as_ref(), &[1u8; 16], "{name}: a copy does not change");
                assert!(inputs.0.is_empty(), "{name}");
            }
            let dt = DataType::from_wire_name(name);
            assert_eq!(dt.is_some_and(may_stay_a_view), float, "{name}");
        }
    }

    #[test]
    fn registration_outside_the_policy_is_refused_before_the_object_is_opened() {
        let obj = Object::new(64);
        let shm = SharedMemoryRegistry::new();
        let remote = Some("192.0.2.7".parse().unwrap());
        let e = shm.register(remote, "r", &obj.1, 0, 64).unwrap_err();
        assert_eq!(e.kind(), oxserve_core::ErrorKind::PermissionDenied);
        assert!(e.message().contains("loopback"), "{e:?}");
        let e = shm.register(None, "r", &obj.1, 0, 64).unwrap_err();
        assert_eq!(e.kind(), oxserve_core::ErrorKind::PermissionDenied);
        // Outside the prefix: refused whether or not the object exists.
        for key in ["/input_simple", "/no-such-object"] {
            let e = shm.register(LOCAL, "r", key, 0, 64).unwrap_err();
            assert_eq!(e.kind(), oxserve_core::ErrorKind::PermissionDenied, "{key}");
        }
        assert!(shm.status(None).unwrap().is_empty());
        shm.register(LOCAL, "r", &obj.1, 0, 64).unwrap();
        let remote_allowed = SharedMemoryRegistry::with_policy(RegistrationPolicy {
            allow_remote: true,
            ..RegistrationPolicy::default()
        });
        remote_allowed.register(remote, "r", &obj.1, 0, 64).unwrap();
    }

    #[test]
    fn an_object_shrunk_under_a_request_fails_the_request_not_the_server() {
        let obj = Object::new(64 << 10);
        let shm = SharedMemoryRegistry::new();
        shm.register(LOCAL, "r", &obj.1, 0, 64 << 10).unwrap();
        shm.write("o", &at("r", 0, 64 << 10), &vec![1u8; 64 << 10])
            .unwrap();
        let mut inputs = SharedMemoryInputs::new();
        let tensor = shm.view(&at("r", 0, 64 << 10), &mut inputs).unwrap();
        // The client truncates its object while the engine reads the tensor.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&obj.0)
            .unwrap()
            .set_len(0)
            .unwrap();
        let sum: u64 = tensor.iter().map(|&b| u64::from(b)).sum();
        assert_eq!(sum, 0, "the engine read zeros, not a fault");
        let e = inputs.check().unwrap_err();
        assert!(e.message().contains("register the region again"), "{e:?}");
        let e = shm
            .view(&at("r", 0, 16), &mut SharedMemoryInputs::new())
            .unwrap_err();
        assert!(e.message().contains("register the region again"), "{e:?}");
        // Registered again (over an object of the right size), the region serves.
        std::fs::write(&obj.0, vec![2u8; 64 << 10]).unwrap();
        shm.unregister("r");
        shm.register(LOCAL, "r", &obj.1, 0, 64 << 10).unwrap();
        let mut inputs = SharedMemoryInputs::new();
        assert_eq!(shm.view(&at("r", 0, 4), &mut inputs).unwrap().as_ref(), &[2u8; 4]);
        inputs.check().unwrap();
    }

    #[test]
    fn the_number_of_regions_is_bounded() {
        let obj = Object::new(64);
        let shm = SharedMemoryRegistry::new();
        for i in 0..MAX_REGIONS {
            shm.register(LOCAL, &format!("r{i}"), &obj.1, 0, 64).unwrap();
        }
        let e = shm.register(LOCAL, "one-more", &obj.1, 0, 64).unwrap_err();
        assert!(e.message().contains("unregister some first"), "{e:?}");
        shm.unregister("r0");
        shm.register(LOCAL, "one-more", &obj.1, 0, 64).unwrap();
    }

    #[test]
    fn a_disabled_registry_refuses_registrations_and_tensors() {
        let obj = Object::new(64);
        let shm = SharedMemoryRegistry::disabled();
        let e = shm.register(LOCAL, "r", &obj.1, 0, 64).unwrap_err();
        assert_eq!(e.kind(), oxserve_core::ErrorKind::Unsupported);
        let e = shm.read(&at("r", 0, 4)).unwrap_err();
        assert!(e.message().contains("disabled"), "{e:?}");
        assert!(shm.status(None).unwrap().is_empty());
    }

    #[test]
    fn tensor_parameters() {
        let mut p = Parameters::new();
        assert_eq!(take_shm_ref("input", "x", &mut p).unwrap(), None);
        p.insert(REGION_PARAM.into(), ParamValue::String("r".into()));
        p.insert(BYTE_SIZE_PARAM.into(), ParamValue::Int(16));
        p.insert(OFFSET_PARAM.into(), ParamValue::Int(4));
        p.insert("other".into(), ParamValue::Bool(true));
        assert_eq!(take_shm_ref("input", "x", &mut p).unwrap(), Some(at("r", 4, 16)));
        assert_eq!(p.len(), 1, "the shared-memory parameters are consumed");
        let mut back = at("r", 4, 16).params();
        assert_eq!(
            take_shm_ref("input", "x", &mut back).unwrap(),
            Some(at("r", 4, 16))
        );

        let mut p = Parameters::new();
        p.insert(REGION_PARAM.into(), ParamValue::String("r".into()));
        assert!(take_shm_ref("input", "x", &mut p).is_err(), "byte size missing");
        let mut p = Parameters::new();
        p.insert(BYTE_SIZE_PARAM.into(), ParamValue::Int(4));
        assert!(take_shm_ref("input", "x", &mut p).is_err(), "region missing");
        let mut p = Parameters::new();
        p.insert(REGION_PARAM.into(), ParamValue::Int(1));
        p.insert(BYTE_SIZE_PARAM.into(), ParamValue::Int(4));
        assert!(take_shm_ref("input", "x", &mut p).is_err(), "region not a string");
        let mut p = Parameters::new();
        p.insert(REGION_PARAM.into(), ParamValue::String("r".into()));
        p.insert(BYTE_SIZE_PARAM.into(), ParamValue::Int(-4));
        assert!(take_shm_ref("input", "x", &mut p).is_err(), "negative size");
    }
}
