//! TorchServe's model archives (`.mar`): a zip with `MAR-INF/MANIFEST.json`, the serialized
//! model, the handler and extra files. Unpacked into a private directory, never outside it:
//! entries with absolute paths or `..` are refused, as are archives past the size limits.

use std::io::Read;
use std::path::{Path, PathBuf};

use oxserve_core::{Error, Result};
use serde::Deserialize;

/// Limits on what an archive may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveLimits {
    pub max_entries: usize,
    pub max_total_bytes: u64,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        ArchiveLimits {
            max_entries: 10_000,
            max_total_bytes: 8 << 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub runtime: String,
    pub model: ManifestModel,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestModel {
    pub model_name: String,
    #[serde(default)]
    pub model_version: String,
    #[serde(default)]
    pub serialized_file: String,
    #[serde(default)]
    pub handler: String,
    #[serde(default)]
    pub model_file: String,
    #[serde(default)]
    pub requirements_file: String,
}

/// An unpacked archive.
#[derive(Debug, Clone)]
pub struct Archive {
    pub manifest: Manifest,
    /// Where it was unpacked.
    pub dir: PathBuf,
}

impl Archive {
    /// The serialized model file, inside the archive's directory.
    pub fn serialized_file(&self) -> Result<PathBuf> {
        let name = &self.manifest.model.serialized_file;
        if name.is_empty() {
            return Err(Error::invalid("the archive's manifest names no serializedFile"));
        }
        inside(&self.dir, name)
    }

    /// An extra file of the archive, if it has one by that name.
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        inside(&self.dir, name).ok().filter(|p| p.is_file())
    }
}

/// `name` joined under `dir`, refused when it would leave it.
fn inside(dir: &Path, name: &str) -> Result<PathBuf> {
    let relative = Path::new(name);
    let safe = relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !safe || name.is_empty() {
        return Err(Error::invalid(format!(
            "archive path '{name}' leaves the archive"
        )));
    }
    Ok(dir.join(relative))
}

/// Unpacks `mar` into `into` (created; must not exist yet) and reads its manifest.
pub fn unpack(mar: &Path, into: &Path, limits: ArchiveLimits) -> Result<Archive> {
    let file = std::fs::File::open(mar)
        .map_err(|e| Error::invalid(format!("cannot open archive {}: {e}", label(mar))))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::invalid(format!("{} is not a model archive (zip): {e}", label(mar))))?;
    if zip.len() > limits.max_entries {
        return Err(Error::invalid(format!(
            "archive {} has {} entries, more than the limit of {}",
            label(mar),
            zip.len(),
            limits.max_entries
        )));
    }
    std::fs::create_dir_all(into)
        .map_err(|e| Error::internal(format!("cannot create {}: {e}", into.display())))?;
    let mut total = 0u64;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| Error::invalid(format!("archive {}: entry {i}: {e}", label(mar))))?;
        let Some(name) = entry.enclosed_name().map(Path::to_path_buf) else {
            return Err(Error::invalid(format!(
                "archive {} has an entry outside the archive: '{}'",
                label(mar),
                entry.name()
            )));
        };
        let target = into.join(&name);
        if entry.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| Error::internal(e.to_string()))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::internal(e.to_string()))?;
        }
        // The declared size is checked, and so is what actually comes out.
        total = total.saturating_add(entry.size());
        if total > limits.max_total_bytes {
            return Err(too_big(mar, limits));
        }
        let mut out = std::fs::File::create(&target).map_err(|e| Error::internal(e.to_string()))?;
        let budget = limits.max_total_bytes - (total - entry.size());
        let copied = std::io::copy(&mut (&mut entry).take(budget + 1), &mut out)
            .map_err(|e| Error::invalid(format!("archive {}: '{}': {e}", label(mar), name.display())))?;
        if copied > budget {
            return Err(too_big(mar, limits));
        }
    }
    let manifest_path = into.join("MAR-INF/MANIFEST.json");
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|_| Error::invalid(format!("archive {} has no MAR-INF/MANIFEST.json", label(mar))))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("archive {}: invalid MANIFEST.json: {e}", label(mar))))?;
    if manifest.model.model_name.is_empty() {
        return Err(Error::invalid(format!(
            "archive {}: the manifest names no model",
            label(mar)
        )));
    }
    Ok(Archive {
        manifest,
        dir: into.to_path_buf(),
    })
}

fn too_big(mar: &Path, limits: ArchiveLimits) -> Error {
    Error::invalid(format!(
        "archive {} unpacks to more than the limit of {} bytes",
        label(mar),
        limits.max_total_bytes
    ))
}

fn label(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;

    use super::*;

    fn archive(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut zip = zip::ZipWriter::new(file.reopen().unwrap());
        for (name, data) in entries {
            zip.start_file(*name, zip::write::FileOptions::default()).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
        file
    }

    const MANIFEST: &[u8] = br#"{"runtime": "python", "model": {"modelName": "m", "modelVersion": "1.0",
        "serializedFile": "model.pt", "handler": "image_classifier"}, "archiverVersion": "0.12.0"}"#;

    #[test]
    fn unpacks_and_reads_the_manifest() {
        let mar = archive(&[
            ("MAR-INF/MANIFEST.json", MANIFEST),
            ("model.pt", b"weights"),
            ("index_to_name.json", b"{}"),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let a = unpack(mar.path(), &dir.path().join("m"), ArchiveLimits::default()).unwrap();
        assert_eq!(a.manifest.model.model_name, "m");
        assert_eq!(a.manifest.model.handler, "image_classifier");
        assert_eq!(std::fs::read(a.serialized_file().unwrap()).unwrap(), b"weights");
        assert!(a.file("index_to_name.json").is_some());
        assert!(a.file("../etc/passwd").is_none());
    }

    #[test]
    fn refuses_escaping_entries_missing_manifests_and_bombs() {
        let dir = tempfile::tempdir().unwrap();
        let evil = archive(&[("../evil.txt", b"x"), ("MAR-INF/MANIFEST.json", MANIFEST)]);
        let err = unpack(evil.path(), &dir.path().join("a"), ArchiveLimits::default()).unwrap_err();
        assert!(err.to_string().contains("outside the archive"), "{err}");
        assert!(!dir.path().join("evil.txt").exists());
        let bare = archive(&[("model.pt", b"x")]);
        let err = unpack(bare.path(), &dir.path().join("b"), ArchiveLimits::default()).unwrap_err();
        assert!(err.to_string().contains("MANIFEST.json"), "{err}");
        let big = archive(&[("MAR-INF/MANIFEST.json", MANIFEST), ("model.pt", &[0u8; 4096])]);
        let limits = ArchiveLimits {
            max_entries: 10,
            max_total_bytes: 1024,
        };
        let err = unpack(big.path(), &dir.path().join("c"), limits).unwrap_err();
        assert!(err.to_string().contains("more than the limit"), "{err}");
        let not_zip = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_zip.path(), b"not a zip").unwrap();
        assert!(unpack(not_zip.path(), &dir.path().join("d"), ArchiveLimits::default()).is_err());
    }
}
