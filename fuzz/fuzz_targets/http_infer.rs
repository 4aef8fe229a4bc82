//! KServe v2 HTTP inference requests through the real router: the JSON request, the binary
//! tensor extension (`Inference-Header-Content-Length` and the split of the body), gzip
//! bodies, shared-memory parameters, against the example models on tract.
//!
//! Input layout: byte 0 picks the route, byte 1 holds flags (content type, whether the
//! header-length header is sent and how, gzip), bytes 2..6 a little-endian u32 header length,
//! the rest is the body.
#![no_main]

use std::io::Write as _;

use axum::body::Body;
use libfuzzer_sys::fuzz_target;
use oxserve_fuzz::{assert_client_answer, server};

const ROUTES: [&str; 4] = [
    "/v2/models/add_sub/infer",
    "/v2/models/add_sub/versions/1/infer",
    "/v2/models/iris/infer",
    "/v2/models/add_sub/versions/18446744073709551616/infer",
];

fuzz_target!(|data: &[u8]| {
    let [route, flags, l0, l1, l2, l3, body @ ..] = data else {
        return;
    };
    let header_len = u32::from_le_bytes([*l0, *l1, *l2, *l3]);
    let mut request = http::Request::post(ROUTES[usize::from(*route) % ROUTES.len()]);
    match flags & 0b11 {
        1 => request = request.header(http::header::CONTENT_TYPE, "application/json"),
        2 => request = request.header(http::header::CONTENT_TYPE, "application/octet-stream"),
        3 => request = request.header(http::header::CONTENT_TYPE, "application/json; charset=utf-8"),
        _ => {}
    }
    if flags & 0b100 != 0 {
        // As a number, or as the signed value of the same bits (a negative length).
        let value = if flags & 0b1_0000 != 0 {
            (header_len as i32).to_string()
        } else {
            header_len.to_string()
        };
        request = request.header("inference-header-content-length", value);
    }
    let body = if flags & 0b1000 != 0 {
        request = request.header(http::header::CONTENT_ENCODING, "gzip");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = gz.write_all(body);
        gz.finish().unwrap_or_default()
    } else {
        body.to_vec()
    };
    let Ok(request) = request.body(Body::from(body)) else {
        return;
    };
    let (status, answer) = server().http(request);
    assert_client_answer(status, &answer, &data);
});
