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

/// An FP32 CHW tensor named as the model's first input, `[3, height, width]`, from
/// `value(channel, y, x)`, written straight into the tensor's little-endian bytes.
fn chw_tensor(height: u32, width: u32, value: impl Fn(usize, u32, u32) -> f32) -> Tensor {
    let mut raw = Vec::with_capacity(3 * (height * width) as usize * 4);
    for c in 0..3 {
        for y in 0..height {
            for x in 0..width {
                raw.extend_from_slice(&value(c, y, x).to_le_bytes());
            }
        }
    }
    Tensor::new(
        "INPUT__0",
        DataType::F32,
        vec![3, i64::from(height), i64::from(width)],
        TensorData::Raw(Bytes::from(raw)),
    )
}

/// What ToTensor then Normalize(ImageNet) make of each channel's 256 pixel values, computed
/// as torchvision computes them (`v / 255`, then `(v - mean) / std`, in f32), so a table look-up
/// gives the same floats as the arithmetic per pixel.
fn normalised_values() -> &'static [[f32; 256]; 3] {
    static TABLE: std::sync::OnceLock<[[f32; 256]; 3]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - MEAN[c]) / STD[c]))
    })
}

/// torchvision's Resize on a PIL image: Pillow's bilinear convolution (its filter widened by
/// the scale when shrinking, as PIL's antialiasing does), by fast_image_resize, which
/// implements Pillow's algorithm: the pixels are PIL's or one level off (3.6 % of the samples
/// of the test kitten, checked against torchvision).
fn resize(image: image::RgbImage, width: u32, height: u32) -> Result<Vec<u8>> {
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image};
    let (w, h) = image.dimensions();
    let src = Image::from_vec_u8(w, h, image.into_raw(), PixelType::U8x3)
        .map_err(|e| Error::internal(format!("cannot resize the image: {e}")))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    Resizer::new()
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)),
        )
        .map_err(|e| Error::internal(format!("cannot resize the image: {e}")))?;
    Ok(dst.into_vec())
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
    // A thin image resizes to a huge one (1 × 8192 → 256 × 2,097,152): refused, not allocated.
    if u64::from(nw) * u64::from(nh) * 3 > MAX_DECODE_BYTES {
        return Err(Error::invalid(format!(
            "cannot resize the image: {w}x{h} would become {nw}x{nh}, larger than the limit ({} MiB)",
            MAX_DECODE_BYTES >> 20
        )));
    }
    let resized = resize(image, nw, nh)?;
    // CenterCrop(224): offsets rounded as torchvision rounds them (Python's round: halves to
    // even, so a 341-pixel side starts the crop at 58, not 59).
    let top = ((f64::from(nh) - f64::from(CROP)) / 2.0)
        .round_ties_even()
        .max(0.0) as u32;
    let left = ((f64::from(nw) - f64::from(CROP)) / 2.0)
        .round_ties_even()
        .max(0.0) as u32;
    let table = normalised_values();
    Ok(chw_tensor(CROP, CROP, |c, y, x| {
        if y >= nh || x >= nw {
            return 0.0;
        }
        table[c][usize::from(resized[((top + y) * nw + left + x) as usize * 3 + c])]
    }))
}

/// The object detector's input: the image as it is, `[3, H, W]` in [0, 1] (ToTensor).
pub(super) fn to_tensor(body: &[u8]) -> Result<Tensor> {
    let image = decode(body)?;
    let (w, h) = image.dimensions();
    Ok(chw_tensor(h, w, |c, y, x| {
        f32::from(image.get_pixel(x, y)[c]) / 255.0
    }))
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
        // A thin image that Resize(256) would blow up to 256 × 512,000 pixels is refused too.
        let thin = encoded(image::RgbImage::new(1, 2000), image::ImageFormat::Png);
        let err = normalised_crop(&thin).unwrap_err().to_string();
        assert!(err.contains("1x2000 would become 256x512000"), "{err}");
    }

    #[test]
    fn resizing_is_pillows_bilinear_filter() {
        // Shrinking 4 → 2 pixels with PIL's bilinear filter: its support widened ×2 by the
        // scale, the window cut at the border and the weights renormalised (3/7, 3/7, 1/7 over
        // pixels 0–2 for the first output pixel): Pillow 13 resizes [0, 40, 80, 120] to
        // [29, 91], where a plain 2-tap average would give [20, 100].
        let row = image::RgbImage::from_fn(4, 1, |x, _| {
            let v = (x * 40) as u8;
            image::Rgb([v, v, v])
        });
        let out = resize(row, 2, 1).unwrap();
        assert_eq!(out, [29, 29, 29, 91, 91, 91]);
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
