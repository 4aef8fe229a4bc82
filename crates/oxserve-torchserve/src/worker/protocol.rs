//! TorchServe's binary protocol between its frontend and a Python backend worker
//! (`ts/protocol/otf_message_handler.py` in the `torchserve` package): big-endian `i32`
//! lengths, `-1` ending lists.
//!
//! Frontend → worker:
//! - load: `'L'`, model name, model path, batch size, handler, GPU id (`-1` = CPU), envelope,
//!   `limitMaxImagePixels` (one byte);
//! - inference: `'I'`, then per request: request id, headers (name, value)… `-1`, inputs
//!   (name, content type, value)… `-1`; then `-1`.
//!
//! Worker → frontend (both kinds of answer): code, message, then per request: request id,
//! content type, HTTP status, reason phrase, headers (count, then name, value), payload; then
//! `-1`. A response whose `ts_stream_next` header is `true` is one part of a streamed answer:
//! more follow for that request.
//!
//! The request part (headers and inputs) is encoded once by the API side ([`encode_request`])
//! and travels through the engine as one BYTES element; the worker's answer for a request
//! travels back the same way ([`Reply::encode`] / [`Reply::decode`]).

use std::io::Read;

use bytes::{BufMut, Bytes, BytesMut};

/// One input of a request: a form field, a query parameter or the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub name: String,
    /// Empty when unknown (query parameters, bodies without a Content-Type).
    pub content_type: String,
    pub value: Bytes,
}

/// The request part of an inference message for one request (without its id): its headers
/// and inputs, each list ended by `-1`.
pub fn encode_request(headers: &[(String, String)], inputs: &[Input]) -> Bytes {
    let size = headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum::<usize>()
        + inputs
            .iter()
            .map(|i| 12 + i.name.len() + i.content_type.len() + i.value.len())
            .sum::<usize>()
        + 8;
    let mut out = BytesMut::with_capacity(size);
    for (name, value) in headers {
        put_field(&mut out, name.as_bytes());
        put_field(&mut out, value.as_bytes());
    }
    out.put_i32(-1);
    for input in inputs {
        put_field(&mut out, input.name.as_bytes());
        put_field(&mut out, input.content_type.as_bytes());
        put_field(&mut out, &input.value);
    }
    out.put_i32(-1);
    out.freeze()
}

/// The load message.
pub fn load_message(
    model_name: &str,
    model_dir: &str,
    batch_size: u32,
    handler: &str,
    envelope: &str,
) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(b'L');
    put_field(&mut out, model_name.as_bytes());
    put_field(&mut out, model_dir.as_bytes());
    out.put_i32(i32::try_from(batch_size).unwrap_or(i32::MAX));
    put_field(&mut out, handler.as_bytes());
    out.put_i32(-1); // no GPU
    put_field(&mut out, envelope.as_bytes());
    out.put_u8(1); // limitMaxImagePixels: Pillow's decompression-bomb check stays on
    out.to_vec()
}

/// The inference message for a batch: `(request id, encoded request part)` per request.
pub fn inference_message<'a>(requests: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(b'I');
    for (id, part) in requests {
        put_field(&mut out, id.as_bytes());
        out.put_slice(part);
    }
    out.put_i32(-1);
    out.to_vec()
}

fn put_field(out: &mut BytesMut, bytes: &[u8]) {
    out.put_i32(i32::try_from(bytes.len()).unwrap_or(i32::MAX));
    out.put_slice(bytes);
}

/// Why a worker's answer could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The socket failed or closed (the worker died), or the read timed out.
    Io(std::io::Error),
    /// The bytes do not follow the protocol, or a field is larger than allowed.
    Protocol(String),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// One request's part of a worker's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prediction {
    pub request_id: String,
    pub content_type: String,
    pub status: i32,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Prediction {
    /// Whether more parts of this request's answer follow (TorchServe's streaming).
    pub fn continues(&self) -> bool {
        self.headers
            .iter()
            .any(|(n, v)| n == "ts_stream_next" && v == "true")
    }
}

/// A worker's answer to a load or inference message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub code: i32,
    pub message: String,
    pub predictions: Vec<Prediction>,
}

/// The most predictions one answer may carry (a batch is far smaller).
const MAX_PREDICTIONS: usize = 65_536;

/// Reads one answer. `max_field` bounds every length the worker sends (a payload larger than
/// that is an error, not an allocation).
pub fn read_message(r: &mut impl Read, max_field: usize) -> Result<Message, ReadError> {
    let code = read_i32(r)?;
    let message = read_string(r, max_field)?;
    let mut predictions = Vec::new();
    loop {
        let len = read_i32(r)?;
        if len == -1 {
            break;
        }
        if predictions.len() == MAX_PREDICTIONS {
            return Err(ReadError::Protocol(format!(
                "the worker's answer has more than {MAX_PREDICTIONS} predictions"
            )));
        }
        let request_id = string_of(read_exact(r, checked_len(len, max_field)?)?)?;
        let content_type = read_string(r, max_field)?;
        let status = read_i32(r)?;
        let reason = read_string(r, max_field)?;
        let count = read_i32(r)?;
        let count = usize::try_from(count)
            .ok()
            .filter(|c| *c <= 1024)
            .ok_or_else(|| ReadError::Protocol(format!("invalid header count {count}")))?;
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            headers.push((read_string(r, max_field)?, read_string(r, max_field)?));
        }
        let len = read_i32(r)?;
        let payload = read_exact(r, checked_len(len, max_field)?)?;
        predictions.push(Prediction {
            request_id,
            content_type,
            status,
            reason,
            headers,
            payload,
        });
    }
    Ok(Message {
        code,
        message,
        predictions,
    })
}

fn read_i32(r: &mut impl Read) -> Result<i32, ReadError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(i32::from_be_bytes(b))
}

fn checked_len(len: i32, max: usize) -> Result<usize, ReadError> {
    match usize::try_from(len) {
        Ok(n) if n <= max => Ok(n),
        Ok(n) => Err(ReadError::Protocol(format!(
            "the worker's answer has a field of {n} bytes, over the limit of {max} (max_response_size)"
        ))),
        Err(_) => Err(ReadError::Protocol(format!("invalid field length {len}"))),
    }
}

fn read_exact(r: &mut impl Read, len: usize) -> Result<Vec<u8>, ReadError> {
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_string(r: &mut impl Read, max: usize) -> Result<String, ReadError> {
    let len = read_i32(r)?;
    string_of(read_exact(r, checked_len(len, max)?)?)
}

fn string_of(bytes: Vec<u8>) -> Result<String, ReadError> {
    String::from_utf8(bytes).map_err(|_| ReadError::Protocol("a text field is not UTF-8".into()))
}

/// One request's final answer as it travels from the worker backend to the API: either the
/// handler's response, or the whole batch's failure (the worker's code and message, as
/// TorchServe answers every request of a batch whose handler raised).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Response {
        status: i32,
        reason: String,
        content_type: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Failed {
        code: i32,
        message: String,
    },
}

impl Reply {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Reply::Response {
                status,
                reason,
                content_type,
                headers,
                body,
            } => {
                out.put_u8(0);
                out.put_i32(*status);
                put_field(&mut out, reason.as_bytes());
                put_field(&mut out, content_type.as_bytes());
                out.put_i32(i32::try_from(headers.len()).unwrap_or(i32::MAX));
                for (n, v) in headers {
                    put_field(&mut out, n.as_bytes());
                    put_field(&mut out, v.as_bytes());
                }
                put_field(&mut out, body);
            }
            Reply::Failed { code, message } => {
                out.put_u8(1);
                out.put_i32(*code);
                put_field(&mut out, message.as_bytes());
            }
        }
        out.freeze()
    }

    pub fn decode(bytes: &[u8]) -> Result<Reply, ReadError> {
        let mut r = bytes;
        let mut kind = [0u8; 1];
        r.read_exact(&mut kind)?;
        let max = bytes.len();
        match kind[0] {
            0 => {
                let status = read_i32(&mut r)?;
                let reason = read_string(&mut r, max)?;
                let content_type = read_string(&mut r, max)?;
                let count = usize::try_from(read_i32(&mut r)?)
                    .map_err(|_| ReadError::Protocol("invalid header count".into()))?;
                let mut headers = Vec::with_capacity(count.min(1024));
                for _ in 0..count {
                    headers.push((read_string(&mut r, max)?, read_string(&mut r, max)?));
                }
                let len = read_i32(&mut r)?;
                let body = read_exact(&mut r, checked_len(len, max)?)?;
                Ok(Reply::Response {
                    status,
                    reason,
                    content_type,
                    headers,
                    body,
                })
            }
            1 => Ok(Reply::Failed {
                code: read_i32(&mut r)?,
                message: read_string(&mut r, max)?,
            }),
            k => Err(ReadError::Protocol(format!("unknown reply kind {k}"))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// One prediction: request id, content type, status, headers, payload.
    type Row<'a> = (&'a str, &'a str, i32, &'a [(&'a str, &'a str)], &'a [u8]);

    /// A worker's answer as `create_predict_response` writes it.
    fn worker_answer(code: i32, message: &str, predictions: &[Row<'_>]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_i32(code);
        put_field(&mut out, message.as_bytes());
        for (id, ct, status, headers, payload) in predictions {
            put_field(&mut out, id.as_bytes());
            put_field(&mut out, ct.as_bytes());
            out.put_i32(*status);
            put_field(&mut out, b"");
            out.put_i32(headers.len() as i32);
            for (n, v) in *headers {
                put_field(&mut out, n.as_bytes());
                put_field(&mut out, v.as_bytes());
            }
            put_field(&mut out, payload);
        }
        out.put_i32(-1);
        out.to_vec()
    }

    #[test]
    fn reads_a_batch_answer() {
        let bytes = worker_answer(
            200,
            "Prediction success",
            &[
                ("a", "application/json", 200, &[("x", "1")], b"[1]"),
                ("b", "", 201, &[("ts_stream_next", "true")], b"part"),
            ],
        );
        let m = read_message(&mut bytes.as_slice(), 1 << 20).unwrap();
        assert_eq!(m.code, 200);
        assert_eq!(m.message, "Prediction success");
        assert_eq!(m.predictions.len(), 2);
        assert_eq!(m.predictions[0].payload, b"[1]");
        assert_eq!(m.predictions[0].headers, vec![("x".to_string(), "1".to_string())]);
        assert!(!m.predictions[0].continues());
        assert_eq!(m.predictions[1].status, 201);
        assert!(m.predictions[1].continues());
    }

    #[test]
    fn a_load_answer_has_no_predictions() {
        let bytes = worker_answer(200, "loaded model m", &[]);
        let m = read_message(&mut bytes.as_slice(), 1 << 20).unwrap();
        assert_eq!(
            (m.code, m.message.as_str(), m.predictions.len()),
            (200, "loaded model m", 0)
        );
    }

    #[test]
    fn oversized_and_truncated_answers_are_errors_not_allocations() {
        let bytes = worker_answer(200, "ok", &[("a", "", 200, &[], &[0u8; 100])]);
        assert!(matches!(
            read_message(&mut bytes.as_slice(), 50),
            Err(ReadError::Protocol(m)) if m.contains("over the limit")
        ));
        let mut lying = BytesMut::new();
        lying.put_i32(200);
        lying.put_i32(i32::MAX);
        assert!(read_message(&mut &lying[..], 1 << 20).is_err());
        assert!(matches!(
            read_message(&mut &bytes[..bytes.len() - 3], 1 << 20),
            Err(ReadError::Io(_))
        ));
    }

    #[test]
    fn request_parts_follow_the_frame_format() {
        let part = encode_request(
            &[("x-echo".into(), "hi".into())],
            &[Input {
                name: "body".into(),
                content_type: "application/json".into(),
                value: Bytes::from_static(b"{}"),
            }],
        );
        let msg = inference_message([("id1", &part[..])]);
        let mut expected = vec![b'I'];
        expected.extend_from_slice(&3i32.to_be_bytes());
        expected.extend_from_slice(b"id1");
        expected.extend_from_slice(&6i32.to_be_bytes());
        expected.extend_from_slice(b"x-echo");
        expected.extend_from_slice(&2i32.to_be_bytes());
        expected.extend_from_slice(b"hi");
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&4i32.to_be_bytes());
        expected.extend_from_slice(b"body");
        expected.extend_from_slice(&16i32.to_be_bytes());
        expected.extend_from_slice(b"application/json");
        expected.extend_from_slice(&2i32.to_be_bytes());
        expected.extend_from_slice(b"{}");
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(msg, expected);
    }

    #[test]
    fn load_message_layout() {
        let msg = load_message("m", "/d", 4, "handler.py", "");
        let mut expected = vec![b'L'];
        expected.extend_from_slice(&1i32.to_be_bytes());
        expected.extend_from_slice(b"m");
        expected.extend_from_slice(&2i32.to_be_bytes());
        expected.extend_from_slice(b"/d");
        expected.extend_from_slice(&4i32.to_be_bytes());
        expected.extend_from_slice(&10i32.to_be_bytes());
        expected.extend_from_slice(b"handler.py");
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&0i32.to_be_bytes());
        expected.push(1);
        assert_eq!(msg, expected);
    }

    #[test]
    fn replies_round_trip() {
        for reply in [
            Reply::Response {
                status: 202,
                reason: "Custom".into(),
                content_type: "application/x".into(),
                headers: vec![("h".into(), "v".into())],
                body: b"body".to_vec(),
            },
            Reply::Failed {
                code: 503,
                message: "Prediction failed".into(),
            },
        ] {
            assert_eq!(Reply::decode(&reply.encode()).unwrap(), reply);
        }
        assert!(Reply::decode(b"\x07").is_err());
        assert!(Reply::decode(b"").is_err());
    }
}
