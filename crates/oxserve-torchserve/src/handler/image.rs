//! Decoding a request's image and turning it into a model input as TorchServe's vision
//! handlers do with torchvision: the classifier's and segmenter's Resize(256), CenterCrop(224),
//! ToTensor, Normalize(ImageNet); the object detector's ToTensor alone.

use bytes::Bytes;
use oxserve_core::{DataType, Error, Result, Tensor, TensorData};

/// ImageNet's normalisation, as torchvision's `Normalize` in TorchServe's `VisionHandler`.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
const RESIZE: u32 = 256;
pub(super) const CROP: u32 = 224;
/// The largest image side decoded, and the most memory a decode may take.
const MAX_SIDE: u32 = 8192;
const MAX_DECODE_BYTES: u64 = 256 << 20;

/// The request's image as RGB. A small file can declare a huge image: dimensions and decoder
/// memory are capped so a request cannot make the server allocate gigabytes. JPEG goes through
/// libjpeg-turbo's decoder (mozjpeg's build of it: the accurate integer IDCT and smooth chroma
/// upsampling, as PIL decodes for TorchServe, so the pixels are PIL's); other formats through
/// the `image` crate.
fn decode(body: &[u8]) -> Result<image::RgbImage> {
    let image = if body.starts_with(&[0xff, 0xd8, 0xff]) {
        decode_jpeg(body)?
    } else {
        decode_other(body)?
    };
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::invalid("the image is empty"));
    }
    Ok(image)
}

fn cannot_decode(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("cannot decode the image: {e}"))
}

fn decode_jpeg(body: &[u8]) -> Result<image::RgbImage> {
    // mozjpeg reports libjpeg's errors by unwinding through its Rust callbacks; a decode that
    // fails in a way it does not turn into an `Err` must still be a bad request.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Option<(u32, u32, Vec<u8>)>> {
        let mut header = mozjpeg::Decompress::new_mem(body)?;
        let (w, h) = (header.width(), header.height());
        if w > MAX_SIDE as usize || h > MAX_SIDE as usize || (w * h * 3) as u64 > MAX_DECODE_BYTES {
            return Ok(None);
        }
        header.dct_method(mozjpeg::DctMethod::IntegerSlow);
        header.do_fancy_upsampling(true);
        let mut started = header.rgb()?;
        let pixels = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok(Some((w as u32, h as u32, pixels)))
    });
    match decoded {
        Ok(Ok(Some((w, h, pixels)))) => image::RgbImage::from_raw(w, h, pixels)
            .ok_or_else(|| cannot_decode("the JPEG decoder returned too few pixels")),
        Ok(Ok(None)) => Err(cannot_decode(format!(
            "the image is larger than the limits ({MAX_SIDE} pixels a side, {} MiB decoded)",
            MAX_DECODE_BYTES >> 20
        ))),
        Ok(Err(e)) => Err(cannot_decode(e)),
        Err(_) => Err(cannot_decode("the JPEG data is corrupt")),
    }
}

fn decode_other(body: &[u8]) -> Result<image::RgbImage> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(body))
        .with_guessed_format()
        .map_err(cannot_decode)?;
    reader.limits(limits);
    Ok(reader.decode().map_err(cannot_decode)?.to_rgb8())
}

/// An FP32 CHW tensor named as the model's first input.
fn chw_tensor(values: Vec<f32>, height: u32, width: u32) -> Tensor {
    let mut raw = Vec::with_capacity(values.len() * 4);
    for v in values {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    Tensor::new(
        "INPUT__0",
        DataType::F32,
        vec![3, i64::from(height), i64::from(width)],
        TensorData::Raw(Bytes::from(raw)),
    )
}

/// The classifier's and segmenter's input: `[3, 224, 224]`.
pub(super) fn normalised_crop(body: &[u8]) -> Result<Tensor> {
    let image = decode(body)?;
    let (w, h) = image.dimensions();
    // torchvision's Resize(256): the short side to 256, the long one in proportion (floored).
    let (nw, nh) = if w <= h {
        (RESIZE, ((u64::from(RESIZE) * u64::from(h)) / u64::from(w)) as u32)
    } else {
        (((u64::from(RESIZE) * u64::from(w)) / u64::from(h)) as u32, RESIZE)
    };
    let resized = image::imageops::resize(&image, nw, nh, image::imageops::FilterType::Triangle);
    // CenterCrop(224): offsets rounded as torchvision rounds them (Python's round: halves to
    // even, so a 341-pixel side starts the crop at 58, not 59).
    let top = ((f64::from(nh) - f64::from(CROP)) / 2.0)
        .round_ties_even()
        .max(0.0) as u32;
    let left = ((f64::from(nw) - f64::from(CROP)) / 2.0)
        .round_ties_even()
        .max(0.0) as u32;
    let plane = (CROP * CROP) as usize;
    let mut chw = vec![0f32; 3 * plane];
    for y in 0..CROP.min(nh) {
        for x in 0..CROP.min(nw) {
            let pixel = resized.get_pixel(left + x, top + y);
            for c in 0..3 {
                let v = f32::from(pixel[c]) / 255.0;
                chw[c * plane + (y * CROP + x) as usize] = (v - MEAN[c]) / STD[c];
            }
        }
    }
    Ok(chw_tensor(chw, CROP, CROP))
}

/// The object detector's input: the image as it is, `[3, H, W]` in [0, 1] (ToTensor).
pub(super) fn to_tensor(body: &[u8]) -> Result<Tensor> {
    let image = decode(body)?;
    let (w, h) = image.dimensions();
    let plane = (w * h) as usize;
    let mut chw = vec![0f32; 3 * plane];
    for (x, y, pixel) in image.enumerate_pixels() {
        for c in 0..3 {
            chw[c * plane + (y * w + x) as usize] = f32::from(pixel[c]) / 255.0;
        }
    }
    Ok(chw_tensor(chw, h, w))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use image::ImageEncoder;

    use super::*;

    /// PNG's CRC-32 (for the chunk patched in the test).
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn encoded(img: image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut out), format)
            .unwrap();
        out
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.raw()
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn images_become_normalised_chw_crops() {
        let img = image::RgbImage::from_fn(300, 200, |x, _| image::Rgb([(x % 256) as u8, 128, 255]));
        let png = encoded(img, image::ImageFormat::Png);
        let t = normalised_crop(&png).unwrap();
        assert_eq!(t.shape, [3, 224, 224]);
        let v = values(&t);
        // Blue is 255 everywhere: (1 - 0.406) / 0.225.
        assert!((v[2 * 224 * 224] - (1.0 - 0.406) / 0.225).abs() < 1e-5);
        assert!(
            normalised_crop(b"not an image")
                .unwrap_err()
                .to_string()
                .contains("cannot decode")
        );
        // A tiny PNG that declares a 100,000 × 100,000 image is refused, not allocated.
        let mut header = Vec::new();
        image::codecs::png::PngEncoder::new(&mut header)
            .write_image(&[0u8; 3], 1, 1, image::ExtendedColorType::Rgb8)
            .unwrap();
        // Patch the IHDR width and height (bytes 16..24) and its CRC (bytes 29..33).
        header[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        header[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&header[12..29]);
        header[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = normalised_crop(&header).unwrap_err().to_string();
        assert!(
            err.contains("cannot decode") && err.to_lowercase().contains("limit"),
            "{err}"
        );
    }

    #[test]
    fn jpegs_decode_within_the_limits_and_bad_ones_are_refused() {
        let img = image::RgbImage::from_fn(16, 8, |x, _| image::Rgb([(x * 16) as u8, 0, 200]));
        let jpg = encoded(img, image::ImageFormat::Jpeg);
        assert_eq!(decode(&jpg).unwrap().dimensions(), (16, 8));
        // The frame header (SOF0: FF C0, length, precision, then height and width) patched
        // to declare 60,000 x 60,000 pixels: refused before decoding.
        let sof = jpg.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
        let mut bomb = jpg.clone();
        bomb[sof + 5..sof + 7].copy_from_slice(&60_000u16.to_be_bytes());
        bomb[sof + 7..sof + 9].copy_from_slice(&60_000u16.to_be_bytes());
        let err = decode(&bomb).unwrap_err().to_string();
        assert!(err.contains("limits"), "{err}");
        for broken in [&jpg[..jpg.len() / 2], &jpg[..20], &[0xff, 0xd8, 0xff][..]] {
            let err = decode(broken).unwrap_err().to_string();
            assert!(err.contains("cannot decode"), "{} bytes: {err}", broken.len());
        }
    }

    #[test]
    fn to_tensor_keeps_the_image_size_and_scales_to_one() {
        let img = image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([(x * 50) as u8, (y * 100) as u8, 255]));
        let t = to_tensor(&encoded(img, image::ImageFormat::Png)).unwrap();
        assert_eq!(t.shape, [3, 3, 5]);
        let v = values(&t);
        // Red at (x = 4, y = 0) is 200 / 255; blue is 1 everywhere.
        assert_eq!(v[4], 200.0 / 255.0);
        assert!(v[2 * 15..].iter().all(|&b| b == 1.0));
    }
}
