//! Multipart form bodies (`curl -F data=@kitten.jpg`), which TorchServe's inference API takes
//! beside raw bodies: each part's name, content type and bytes, read with multer.

use bytes::Bytes;
use oxserve_core::{Error, Result};

/// One part of a form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    /// A file upload's declared type; empty for plain fields (as TorchServe passes them).
    pub content_type: String,
    pub data: Bytes,
}

/// Every part of a multipart body already in memory, in order.
pub async fn parts(boundary: &str, body: Bytes) -> Result<Vec<Part>> {
    let stream = futures::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut out = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| Error::invalid(format!("invalid multipart body: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let content_type = match (field.file_name(), field.content_type()) {
            (Some(_), Some(mime)) => mime.essence_str().to_string(),
            _ => String::new(),
        };
        let data = field
            .bytes()
            .await
            .map_err(|e| Error::invalid(format!("invalid multipart body: {e}")))?;
        out.push(Part {
            name,
            content_type,
            data,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_every_part() {
        let body = "--XX\r\nContent-Disposition: form-data; name=\"data\"; filename=\"a.jpg\"\r\n\r\nJPEG\r\n--XX\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--XX--\r\n";
        let found = parts("XX", Bytes::from(body)).await.unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].name, "data");
        assert_eq!(found[0].data, Bytes::from_static(b"JPEG"));
        assert_eq!(
            (found[1].name.as_str(), found[1].content_type.as_str()),
            ("other", "")
        );
        assert!(parts("XX", Bytes::from_static(b"garbage")).await.is_err());
    }
}
