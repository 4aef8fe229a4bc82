//! Limits and helpers for decoding tensor data, shared by every adapter: the bound on BYTES
//! elements, the length-prefixed BYTES split, and moving large decodes off the async workers.

use bytes::Bytes;
use oxserve_core::{DataType, Error, Result, Tensor, TensorData};

/// Default for [`DecodeLimits::max_bytes_elements`]: 1,048,576 BYTES elements per request.
///
/// Each BYTES element costs a 32-byte `Bytes` handle in memory (plus, from JSON, an
/// allocation of its own), whatever its length on the wire: an empty element is 4 bytes in
/// the binary form and 3 in JSON, so a 64 MiB body of empty strings would become 0.5–1 GiB.
/// At this limit the handles of one request stay under 32 MiB, while a batch of a million
/// strings — far more than text or image-bytes models take per request — still fits.
pub const DEFAULT_MAX_BYTES_ELEMENTS: usize = 1 << 20;

/// Requests whose data to decode is at least this large are decoded on tokio's blocking
/// pool instead of an async worker thread.
///
/// Decoding JSON numbers runs at roughly 100–200 MB/s, so 64 KiB is a few hundred
/// microseconds of a worker that every other connection on it waits for; handing the work to
/// the blocking pool costs a few microseconds (a thread wake-up and the return), under 5 % of
/// such a decode and nothing for the small requests that make up most traffic (add_sub's
/// JSON body is about 200 bytes).
pub const OFF_WORKER_DECODE_BYTES: usize = 64 << 10;

/// Limits applied while decoding a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most BYTES elements in one request, over all its inputs.
    pub max_bytes_elements: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_bytes_elements: DEFAULT_MAX_BYTES_ELEMENTS,
        }
    }
}

impl DecodeLimits {
    /// A budget for one request.
    pub fn budget(&self) -> BytesBudget {
        BytesBudget {
            left: self.max_bytes_elements,
            limit: self.max_bytes_elements,
        }
    }
}

/// What is left of one request's BYTES elements. Decoders take each BYTES input's element
/// count (from its shape) before decoding its data, and decode no more elements than the
/// shape holds, so a request never holds more than the limit in memory.
#[derive(Debug, Clone)]
pub struct BytesBudget {
    left: usize,
    limit: usize,
}

impl BytesBudget {
    /// Takes `elements` for input `name` if it is BYTES; INVALID_ARGUMENT once the request
    /// would go over the limit.
    pub fn take(&mut self, name: &str, datatype: DataType, elements: usize) -> Result<()> {
        if datatype != DataType::Bytes {
            return Ok(());
        }
        match self.left.checked_sub(elements) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(Error::invalid(format!(
                "input '{name}': the request has more than {} BYTES elements, the most this \
                 server decodes per request (--max-bytes-elements)",
                self.limit
            ))),
        }
    }
}

/// Tensor data from Triton's binary form (a binary-extension slice, gRPC raw contents, a
/// shared-memory region): the bytes as they are for fixed-size types; for BYTES the
/// length-prefixed elements, at most `elements` of them (the shape's count), so a body cannot
/// make the server hold more elements than the shape, and the budget, allow.
pub fn data_from_wire(name: &str, datatype: DataType, elements: usize, raw: Bytes) -> Result<TensorData> {
    if datatype.size().is_some() {
        return Ok(TensorData::Raw(raw));
    }
    Ok(TensorData::Strings(Tensor::strings_from_wire(
        name, &raw, elements,
    )?))
}

/// Runs `decode` here when `work_bytes` is small, else on tokio's blocking pool (see
/// [`OFF_WORKER_DECODE_BYTES`]). Outside a tokio runtime it always runs here.
pub async fn decode_off_worker<T, F>(work_bytes: usize, decode: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    if work_bytes < OFF_WORKER_DECODE_BYTES || tokio::runtime::Handle::try_current().is_err() {
        return decode();
    }
    tokio::task::spawn_blocking(decode)
        .await
        .map_err(|e| Error::internal(format!("request decoding failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(items: &[&[u8]]) -> Bytes {
        let mut out = Vec::new();
        for i in items {
            out.extend_from_slice(&(i.len() as u32).to_le_bytes());
            out.extend_from_slice(i);
        }
        Bytes::from(out)
    }

    #[test]
    fn bytes_split_stops_at_the_shape() {
        let two = wire(&[b"a", b""]);
        assert_eq!(
            data_from_wire("s", DataType::Bytes, 2, two.clone()).ok(),
            Some(TensorData::Strings(vec![Bytes::from_static(b"a"), Bytes::new()]))
        );
        let e = data_from_wire("s", DataType::Bytes, 1, two).err();
        assert!(e.is_some_and(|e| {
            e.message()
                .contains("more BYTES elements than its shape holds (1)")
        }));
        let e = data_from_wire("s", DataType::Bytes, 5, Bytes::from_static(&[9, 0, 0, 0, b'x'])).err();
        assert!(e.is_some_and(|e| e.message().contains("claims 9 bytes")));
        let e = data_from_wire("s", DataType::Bytes, 5, Bytes::from_static(&[1, 0])).err();
        assert!(e.is_some_and(|e| e.message().contains("truncated")));
        let raw = Bytes::from_static(&[0, 0, 128, 63]);
        assert_eq!(
            data_from_wire("f", DataType::F32, 1, raw.clone()).ok(),
            Some(TensorData::Raw(raw))
        );
    }

    #[test]
    fn budget_counts_bytes_inputs_only() {
        let mut b = DecodeLimits {
            max_bytes_elements: 10,
        }
        .budget();
        assert!(b.take("f", DataType::F32, 1_000).is_ok());
        assert!(b.take("a", DataType::Bytes, 6).is_ok());
        assert!(b.take("b", DataType::Bytes, 4).is_ok());
        let e = b.take("c", DataType::Bytes, 1).err();
        assert!(e.is_some_and(|e| e.message().contains("more than 10 BYTES elements")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn large_decodes_leave_the_worker() {
        let here = std::thread::current().id();
        let small = decode_off_worker(10, move || Ok(std::thread::current().id())).await;
        assert_eq!(small.ok(), Some(here));
        let large = decode_off_worker(OFF_WORKER_DECODE_BYTES, move || Ok(std::thread::current().id())).await;
        assert!(large.is_ok_and(|id| id != here));
        let failed: Result<()> = decode_off_worker(1 << 30, || Err(Error::invalid("bad"))).await;
        assert!(failed.is_err_and(|e| e.message() == "bad"));
    }
}
