//! The live lifecycle of models while the server takes traffic: load, reload and unload
//! requests (Triton's explicit mode), repository polling (poll mode), and the retirement of
//! versions taken out of service.
//!
//! Every change is computed off the request path (on the caller's blocking thread or the
//! poll thread), then published as a new model table in one atomic swap; requests resolve
//! against whichever table they loaded, so none waits and none fails because of a change. A
//! version taken out of the table keeps its scheduler until the last request that resolved it
//! has finished (its queue drains), and is then dropped on the retirement thread.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwap;
use oxserve_core::{Error, Result};
use oxserve_repository::ModelDir;
use parking_lot::{Condvar, Mutex};

use crate::manager::{ControlMode, ModelManager, ModelRecord, ModelTable, VersionState};
use crate::model::ServedVersion;

/// The outcome of loading one model: each selected version loaded (or why not), or why the
/// model as a whole could not load.
#[derive(Default)]
pub(crate) struct Built {
    pub versions: BTreeMap<u64, std::result::Result<Arc<ServedVersion>, String>>,
    pub error: Option<String>,
    /// config.pbtxt's `version_labels`.
    pub labels: BTreeMap<String, u64>,
    /// config.pbtxt's `traffic_split` and `shadow`.
    pub split: Option<crate::traffic::TrafficSplit>,
    pub shadow: Option<crate::traffic::ShadowTraffic>,
}

impl Built {
    pub(crate) fn failed(reason: String) -> Built {
        Built {
            error: Some(reason),
            ..Built::default()
        }
    }
}

/// What the poll loop remembers between scans.
#[derive(Default)]
pub(crate) struct PollState {
    /// The fingerprint each model directory had at the previous scan (`None`: it was missing).
    seen: BTreeMap<String, Option<u64>>,
    /// The fingerprint of each model directory's last load attempt.
    applied: BTreeMap<String, u64>,
}

/// A file's identity for change detection: path, size, modification time; a config.pbtxt's
/// content too (an edit within the file system's timestamp granularity still counts).
fn hash_tree(root: &Path, dir: &Path, depth: usize, hasher: &mut DefaultHasher) {
    // Deep trees are not model repositories; stop rather than walk a loop of symlinks.
    if depth > 16 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        "unreadable".hash(hasher);
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        path.strip_prefix(root).unwrap_or(&path).hash(hasher);
        if meta.is_dir() {
            hash_tree(root, &path, depth + 1, hasher);
            continue;
        }
        meta.len().hash(hasher);
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos());
        modified.hash(hasher);
        if path.file_name().is_some_and(|n| n == "config.pbtxt")
            && let Ok(text) = std::fs::read(&path)
        {
            text.hash(hasher);
        }
    }
}

/// A fingerprint of everything under a directory (names, sizes, modification times).
pub(crate) fn fingerprint_dir(path: &Path) -> u64 {
    let mut hasher = DefaultHasher::new();
    hash_tree(path, path, 0, &mut hasher);
    hasher.finish()
}

/// What a version is loaded from, for deciding what a reload must redo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VersionKeys {
    /// The configuration and the version directory's files: equal, nothing to redo.
    pub load: u64,
    /// The version directory's files alone.
    pub files: u64,
    /// The configuration with every instance group's count set to 0: equal (and the files
    /// too), only the instance counts changed.
    pub shape: u64,
}

impl VersionKeys {
    pub(crate) fn of(
        config: &oxserve_repository::pb::ModelConfig,
        config_json: &str,
        model_dir: &Path,
        version: u64,
    ) -> VersionKeys {
        let files = fingerprint_dir(&model_dir.join(version.to_string()));
        let mut load = DefaultHasher::new();
        config_json.hash(&mut load);
        files.hash(&mut load);
        let mut counts_free = config.clone();
        for group in &mut counts_free.instance_group {
            group.count = 0;
        }
        let mut shape = DefaultHasher::new();
        oxserve_repository::config_to_json(&counts_free).hash(&mut shape);
        VersionKeys {
            load: load.finish(),
            files,
            shape: shape.finish(),
        }
    }
}

/// Files a load request carries (`file:<version>/<name>` parameters): written under a
/// temporary model directory that the model is then loaded from.
pub struct OverrideFile {
    /// The path under the model directory, e.g. `1/model.onnx`.
    pub path: String,
    pub contents: Vec<u8>,
}

/// A load request's overrides (Triton's load parameters): a configuration (JSON, as the model
/// configuration endpoint shows it) instead of config.pbtxt, and the model's files.
#[derive(Default)]
pub struct LoadOverride {
    pub config_json: Option<String>,
    pub files: Vec<OverrideFile>,
}

impl LoadOverride {
    pub fn is_empty(&self) -> bool {
        self.config_json.is_none() && self.files.is_empty()
    }
}

/// A relative path inside the override directory: no root, no `..`, nothing empty.
fn safe_relative_path(path: &str) -> Option<PathBuf> {
    let candidate = Path::new(path);
    let mut clean = PathBuf::new();
    for component in candidate.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!clean.as_os_str().is_empty()).then_some(clean)
}

impl ModelManager {
    /// Applies `change` to one model's record in the published table (atomically; retried if
    /// another change was published meanwhile).
    pub(crate) fn publish(&self, name: &str, change: impl Fn(Option<&ModelRecord>) -> ModelRecord) {
        if let Some(staged) = self.staging.lock().as_mut() {
            let record = change(staged.models.get(name));
            staged.models.insert(name.to_string(), record);
            return;
        }
        self.table.rcu(|table| {
            let mut next = ModelTable::clone(table);
            let record = change(table.models.get(name));
            next.models.insert(name.to_string(), record);
            next
        });
    }

    /// Shows the versions about to load for the first time as LOADING.
    pub(crate) fn publish_loading(&self, name: &str, versions: &[u64]) {
        self.publish(name, |current| {
            let mut record = current.cloned().unwrap_or_default();
            for v in versions {
                let serving = record.versions.get(v).is_some_and(|s| s.serving().is_some());
                if !serving {
                    record.versions.insert(*v, VersionState::Loading);
                }
            }
            record
        });
    }

    /// Publishes what a load built against what served before it (`current`), and retires the
    /// versions it replaces or drops.
    pub(crate) fn install(
        &self,
        name: &str,
        current: Option<&ModelRecord>,
        built: Built,
        override_dir: Option<tempfile::TempDir>,
    ) -> std::result::Result<(), String> {
        // The load's temporaries (file contents, parsed graphs) are freed by now, on this thread.
        crate::memory::release_freed_memory();
        let serving_before = |v: &u64| -> Option<Arc<ServedVersion>> {
            current
                .and_then(|r| r.versions.get(v))
                .and_then(VersionState::serving)
                .map(Arc::clone)
        };
        let any_serving = current.is_some_and(|r| r.versions.values().any(|s| s.serving().is_some()));
        if let Some(reason) = built.error {
            tracing::error!(model = %name, %reason, "model failed to load");
            if any_serving {
                // The versions loaded before keep serving; the index shows why the reload failed.
                self.publish(name, |latest| {
                    let mut record = latest.cloned().unwrap_or_default();
                    record.versions.retain(|_, s| !matches!(s, VersionState::Loading));
                    record.reload_error = Some(reason.clone());
                    record
                });
            } else {
                self.publish(name, |_| ModelRecord::failed(reason.clone()));
            }
            return Err(reason);
        }

        let failures: Vec<String> = built
            .versions
            .iter()
            .filter_map(|(v, r)| r.as_ref().err().map(|reason| format!("version {v}: {reason}")))
            .collect();
        if any_serving && !failures.is_empty() {
            // A reload is all or nothing: what served keeps serving, unchanged, and the versions
            // this load did bring up are dropped unpublished.
            let reason = format!(
                "the reload failed, the previous load keeps serving: {}",
                failures.join("; ")
            );
            tracing::error!(model = %name, %reason, "model reload failed");
            let mut failed_new = BTreeMap::new();
            for (v, result) in built.versions {
                match result {
                    Ok(served) if serving_before(&v).is_none_or(|old| !Arc::ptr_eq(&old, &served)) => {
                        self.retiring.retire(name, v, served, true);
                    }
                    Ok(_) => {}
                    // Shown in the index; the versions that served are untouched.
                    Err(reason) if serving_before(&v).is_none() => {
                        failed_new.insert(v, VersionState::Unavailable(reason));
                    }
                    Err(_) => {}
                }
            }
            self.publish(name, |latest| {
                let mut record = latest.cloned().unwrap_or_default();
                record.versions.retain(|_, s| !matches!(s, VersionState::Loading));
                for (v, state) in &failed_new {
                    record.versions.entry(*v).or_insert_with(|| state.clone());
                }
                record.reload_error = Some(reason.clone());
                record
            });
            return Err(failures.join("; "));
        }

        let mut versions = BTreeMap::new();
        let mut retire: Vec<(u64, Arc<ServedVersion>, bool)> = Vec::new();
        for (v, result) in built.versions {
            match result {
                Ok(served) => {
                    if let Some(old) = serving_before(&v).filter(|old| !Arc::ptr_eq(old, &served)) {
                        retire.push((v, old, true));
                    }
                    versions.insert(v, VersionState::Ready(served));
                }
                Err(reason) => {
                    versions.insert(v, VersionState::Unavailable(reason));
                }
            }
        }
        // Versions no longer selected: out of service now, unloaded once their requests end.
        let mut leaving = Vec::new();
        if let Some(current) = current {
            for (v, state) in &current.versions {
                if versions.contains_key(v) {
                    continue;
                }
                if let Some(served) = state.serving() {
                    retire.push((*v, Arc::clone(served), false));
                    leaving.push(*v);
                }
            }
        }
        let override_dir = override_dir.map(Arc::new);
        let labels: BTreeMap<String, Vec<u64>> =
            built.labels.iter().map(|(l, v)| (l.clone(), vec![*v])).collect();
        let (split, shadow) = (built.split.clone(), built.shadow.clone());
        self.publish(name, |latest| {
            let mut record = ModelRecord {
                versions: versions.clone(),
                error: None,
                reload_error: None,
                unloaded: false,
                _override_dir: override_dir.clone(),
                labels: labels.clone(),
                default_pin: None,
                split: split.clone(),
                shadow: shadow.clone(),
            };
            for v in &leaving {
                record.versions.insert(*v, VersionState::Unloading);
            }
            // Versions still draining from an earlier change stay visible until they are gone.
            if let Some(latest) = latest {
                for (v, state) in &latest.versions {
                    if matches!(state, VersionState::Unloading) {
                        record.versions.entry(*v).or_insert(VersionState::Unloading);
                    }
                }
            }
            record
        });
        for (v, served, replaced) in retire {
            self.retiring.retire(name, v, served, replaced);
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        }
    }

    /// Triton's load request: (re)loads a model from the repositories, or from the overrides.
    /// Allowed in explicit mode only. Blocking: run it off the async workers.
    pub fn load_model(&self, name: &str, overrides: LoadOverride) -> Result<()> {
        self.check_explicit(name, "load")?;
        let _serial = self.lifecycle.lock();
        let (dirs, duplicates) = self.scan_repositories();
        if let Some((_, reason)) = duplicates.iter().find(|(n, _)| n == name) {
            return Err(Error::invalid(format!("failed to load '{name}': {reason}")));
        }
        let config = match &overrides.config_json {
            Some(json) => {
                let mut cfg = oxserve_repository::config_from_json(json)
                    .map_err(|e| Error::invalid(format!("failed to load '{name}': invalid 'config': {e}")))?;
                if cfg.name.is_empty() {
                    cfg.name = name.to_string();
                } else if cfg.name != name {
                    return Err(Error::invalid(format!(
                        "failed to load '{name}': the 'config' names model '{}'",
                        cfg.name
                    )));
                }
                Some(cfg)
            }
            None => None,
        };
        let (dir, override_dir) = if overrides.files.is_empty() {
            let dir = dirs.get(name).cloned().ok_or_else(|| {
                Error::invalid(format!(
                    "failed to load '{name}': no model directory '{name}' in the model repositories"
                ))
            })?;
            (dir, None)
        } else {
            if config.is_none() {
                return Err(Error::invalid(format!(
                    "failed to load '{name}': model files ('file:' parameters) need a 'config' parameter too"
                )));
            }
            let (dir, temp) = write_override_files(name, &overrides.files)?;
            (dir, Some(temp))
        };
        let result = self.load_dir_inner(&dir, config, override_dir);
        result.map_err(|reason| Error::invalid(format!("failed to load '{name}': {reason}")))
    }

    /// Triton's unload request: takes every version of the model out of service at once; each
    /// is unloaded when its in-flight and queued requests have finished. Explicit mode only.
    pub fn unload_model(&self, name: &str) -> Result<()> {
        self.check_explicit(name, "unload")?;
        let _serial = self.lifecycle.lock();
        if !self.snapshot().models.contains_key(name) {
            let (dirs, _) = self.scan_repositories();
            if !dirs.contains_key(name) {
                return Err(Error::invalid(format!(
                    "failed to unload '{name}': no model named '{name}' is loaded or in the model repositories"
                )));
            }
            return Ok(());
        }
        self.unload_now(name);
        Ok(())
    }

    fn unload_now(&self, name: &str) {
        let current = self.snapshot().models.get(name).cloned().unwrap_or_default();
        let mut retire = Vec::new();
        self.publish(name, |latest| {
            let mut record = ModelRecord {
                unloaded: true,
                ..ModelRecord::default()
            };
            for (v, state) in latest.map(|r| &r.versions).into_iter().flatten() {
                match state {
                    VersionState::Ready(_) | VersionState::Unloading => {
                        record.versions.insert(*v, VersionState::Unloading);
                    }
                    _ => {
                        record.versions.insert(*v, VersionState::Unloaded);
                    }
                }
            }
            record
        });
        for (v, state) in &current.versions {
            if let VersionState::Ready(served) = state {
                retire.push((*v, Arc::clone(served)));
            }
        }
        for (v, served) in retire {
            self.retiring.retire(name, v, served, false);
        }
        tracing::info!(model = %name, "model unloaded (in-flight requests finish first)");
    }

    fn check_explicit(&self, name: &str, what: &str) -> Result<()> {
        match self.options.control_mode {
            ControlMode::Explicit => Ok(()),
            mode => Err(Error::unsupported(format!(
                "cannot {what} '{name}': explicit model load / unload is not allowed in model control mode '{}' (start the server with --model-control-mode=explicit)",
                mode.as_str()
            ))),
        }
    }

    /// One scan of the repositories in poll mode: a model directory that changed (or
    /// appeared) is loaded once it has stayed the same for two scans in a row, so a model
    /// still being copied is never loaded half-written; one that disappeared for two scans
    /// is unloaded. A failed reload keeps the previous versions serving.
    pub fn poll_repositories(&self) {
        let mut state = self.lifecycle.lock();
        let (dirs, _) = self.scan_repositories();
        for (name, dir) in &dirs {
            let now = fingerprint_dir(&dir.path);
            let previous = state.seen.insert(name.clone(), Some(now));
            if state.applied.get(name) == Some(&now) {
                continue;
            }
            if previous != Some(Some(now)) {
                tracing::info!(model = %name, "model directory changed; loading once it stays unchanged for a scan");
                continue;
            }
            state.applied.insert(name.clone(), now);
            if let Err(reason) = self.load_dir_inner(dir, None, None) {
                tracing::error!(model = %name, %reason, "reload after a repository change failed");
            }
        }
        let gone: Vec<String> = state
            .applied
            .keys()
            .filter(|name| !dirs.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            if state.seen.insert(name.clone(), None) == Some(None) {
                state.applied.remove(&name);
                state.seen.remove(&name);
                self.unload_now(&name);
            }
        }
    }

    /// Replaces the listed models (TF Serving's model config reload): new and changed models
    /// load (the versions that did not change keep serving), models no longer listed are
    /// unloaded once their requests finish. Err: why some model failed to load (the others
    /// are applied regardless).
    pub fn set_model_list(&self, models: Vec<crate::manager::ListedModel>) -> Result<()> {
        let mut state = self.lifecycle.lock();
        let new: BTreeMap<String, crate::manager::ListedModel> =
            models.into_iter().map(|m| (m.name.clone(), m)).collect();
        let old = std::mem::replace(&mut *self.listed.write(), new.clone());
        let mut failures = Vec::new();
        for (name, model) in &new {
            if old.get(name) == Some(model) && self.snapshot().models.contains_key(name) {
                continue;
            }
            let dir = ModelDir {
                name: name.clone(),
                path: model.path.clone(),
            };
            let fingerprint = fingerprint_dir(&dir.path);
            state.applied.insert(name.clone(), fingerprint);
            state.seen.insert(name.clone(), Some(fingerprint));
            if let Err(reason) = self.load_dir_inner(&dir, None, None) {
                failures.push(format!("'{name}': {reason}"));
            }
        }
        for name in old.keys().filter(|n| !new.contains_key(*n)) {
            state.applied.remove(name);
            state.seen.remove(name);
            self.unload_now(name);
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid(format!("failed to load {}", failures.join("; "))))
        }
    }

    /// Records the start-up load's fingerprints, so polling starts from what was loaded.
    pub(crate) fn remember_applied(&self, name: &str, fingerprint: u64) {
        let mut state = self.lifecycle.lock();
        state.applied.insert(name.to_string(), fingerprint);
        state.seen.insert(name.to_string(), Some(fingerprint));
    }

    /// Waits until every retired version has been dropped (tests, shutdown).
    pub fn wait_retired(&self, timeout: Duration) -> bool {
        self.retiring.wait_empty(timeout)
    }
}

impl ModelManager {
    /// Points a label at a serving version (run time; the next load re-applies config.pbtxt's
    /// labels). The label's earlier version is kept for [`ModelManager::rollback`].
    pub fn set_version_label(&self, name: &str, label: &str, version: u64) -> Result<()> {
        if !oxserve_repository::is_label_name(label) {
            return Err(Error::invalid(format!(
                "label '{label}' must be 1-64 letters, digits, '_', '-' or '.'"
            )));
        }
        let _serial = self.lifecycle.lock();
        let record = self.serving_record(name)?;
        if record
            .versions
            .get(&version)
            .and_then(VersionState::serving)
            .is_none()
        {
            return Err(Error::invalid(format!(
                "cannot point label '{label}' of model '{name}' at version {version}: it is not serving"
            )));
        }
        if record.label(label) == Some(version) {
            return Ok(());
        }
        self.publish(name, |latest| {
            let mut record = latest.cloned().unwrap_or_default();
            record.labels.entry(label.to_string()).or_default().push(version);
            record
        });
        tracing::info!(model = %name, %label, version, "version label set");
        Ok(())
    }

    /// Rolls a label back to the version it pointed at before, or (no label) the default back
    /// from the version requests get now to the next lower serving version. Effective for the
    /// next request. Ok: the version it points at now.
    pub fn rollback(&self, name: &str, label: Option<&str>) -> Result<u64> {
        let _serial = self.lifecycle.lock();
        let record = self.serving_record(name)?;
        let target = match label {
            Some(label) => {
                let history = record.labels.get(label).ok_or_else(|| {
                    Error::not_found(format!("model '{name}' has no version label '{label}'"))
                })?;
                let previous = history.len().checked_sub(2).map(|i| history[i]).ok_or_else(|| {
                    Error::invalid(format!(
                        "label '{label}' of model '{name}' has pointed only at version {}: nothing to roll back to",
                        history.last().copied().unwrap_or_default()
                    ))
                })?;
                if record
                    .versions
                    .get(&previous)
                    .and_then(VersionState::serving)
                    .is_none()
                {
                    return Err(Error::invalid(format!(
                        "cannot roll label '{label}' of model '{name}' back to version {previous}: it is not serving"
                    )));
                }
                previous
            }
            None => {
                let current = record
                    .default_pin
                    .filter(|pin| record.versions.get(pin).and_then(VersionState::serving).is_some())
                    .or_else(|| record.latest_serving(None))
                    .ok_or_else(|| Error::unavailable(format!("model '{name}' has no serving version")))?;
                record.latest_serving(Some(current)).ok_or_else(|| {
                    Error::invalid(format!(
                        "model '{name}' serves no version below {current}: nothing to roll back to"
                    ))
                })?
            }
        };
        self.publish(name, |latest| {
            let mut record = latest.cloned().unwrap_or_default();
            match label {
                Some(label) => {
                    if let Some(history) = record.labels.get_mut(label) {
                        history.pop();
                    }
                }
                None => record.default_pin = Some(target),
            }
            record
        });
        tracing::info!(model = %name, label = label.unwrap_or("(default)"), version = target, "rolled back");
        Ok(target)
    }

    /// Replaces a model's traffic split and/or shadow at run time (`None` leaves one as it
    /// is; `Some(None)` removes it). The next load re-applies config.pbtxt's.
    pub fn set_traffic(
        &self,
        name: &str,
        split: Option<Option<crate::traffic::TrafficSplit>>,
        shadow: Option<Option<crate::traffic::ShadowTraffic>>,
    ) -> Result<()> {
        if let Some(Some(split)) = &split {
            split.check().map_err(Error::invalid)?;
        }
        if let Some(Some(shadow)) = &shadow {
            shadow.check().map_err(Error::invalid)?;
        }
        let _serial = self.lifecycle.lock();
        self.serving_record(name)?;
        self.publish(name, |latest| {
            let mut record = latest.cloned().unwrap_or_default();
            if let Some(split) = &split {
                record.split = split.clone();
            }
            if let Some(shadow) = &shadow {
                record.shadow = shadow.clone();
            }
            record
        });
        tracing::info!(model = %name, "traffic split / shadow changed");
        Ok(())
    }

    /// A model's traffic split and shadow as they are now.
    pub fn traffic(
        &self,
        name: &str,
    ) -> Result<(
        Option<crate::traffic::TrafficSplit>,
        Option<crate::traffic::ShadowTraffic>,
    )> {
        let table = self.snapshot();
        let record = table
            .models
            .get(name)
            .ok_or_else(|| Error::not_found(format!("Request for unknown model: '{name}' is not found")))?;
        Ok((record.split.clone(), record.shadow.clone()))
    }

    /// A model's labels (label → version) and the version requests without one get.
    pub fn version_labels(&self, name: &str) -> Result<(BTreeMap<String, u64>, Option<u64>)> {
        let table = self.snapshot();
        let record = table
            .models
            .get(name)
            .ok_or_else(|| Error::not_found(format!("Request for unknown model: '{name}' is not found")))?;
        let labels = record
            .labels
            .iter()
            .filter_map(|(l, h)| h.last().map(|v| (l.clone(), *v)))
            .collect();
        let default = record
            .default_pin
            .filter(|pin| record.versions.get(pin).and_then(VersionState::serving).is_some())
            .or_else(|| record.latest_serving(None));
        Ok((labels, default))
    }

    fn serving_record(&self, name: &str) -> Result<ModelRecord> {
        self.snapshot()
            .models
            .get(name)
            .filter(|r| !r.unloaded)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("Request for unknown model: '{name}' is not found")))
    }
}

/// Writes a load request's files under a fresh temporary directory laid out as a repository
/// (`<tmp>/<name>/<version>/<file>`).
fn write_override_files(name: &str, files: &[OverrideFile]) -> Result<(ModelDir, tempfile::TempDir)> {
    let temp = tempfile::Builder::new()
        .prefix("oxserve-load-")
        .tempdir()
        .map_err(|e| Error::internal(format!("cannot create a directory for the model's files: {e}")))?;
    let model_dir = temp.path().join(name);
    for file in files {
        let relative = safe_relative_path(&file.path).ok_or_else(|| {
            Error::invalid(format!(
                "failed to load '{name}': file path 'file:{}' must be relative, inside the model directory",
                file.path
            ))
        })?;
        let path = model_dir.join(relative);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, &file.contents));
        written
            .map_err(|e| Error::internal(format!("cannot write the model's file '{}': {e}", file.path)))?;
    }
    Ok((
        ModelDir {
            name: name.to_string(),
            path: model_dir,
        },
        temp,
    ))
}

/// Versions out of service, dropped on their own thread once nothing else holds them.
pub(crate) struct Retirement {
    shared: Arc<RetireShared>,
}

struct RetireShared {
    queue: Mutex<Vec<Retiree>>,
    changed: Condvar,
}

struct Retiree {
    model: String,
    version: u64,
    served: Arc<ServedVersion>,
    /// A newer load of the same version serves now: nothing to show in the index.
    replaced: bool,
}

/// How often the retirement thread checks whether retired versions are idle.
const RETIRE_CHECK: Duration = Duration::from_millis(20);

impl Retirement {
    /// Starts the retirement thread; it ends when the manager (its table) is dropped.
    pub(crate) fn start(table: Arc<ArcSwap<ModelTable>>) -> Retirement {
        let shared = Arc::new(RetireShared {
            queue: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        });
        let weak_shared = Arc::downgrade(&shared);
        let weak_table = Arc::downgrade(&table);
        let spawned = std::thread::Builder::new()
            .name("oxserve-retire".into())
            .spawn(move || retire_loop(weak_shared, weak_table));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the thread that unloads retired model versions");
        }
        Retirement { shared }
    }

    pub(crate) fn retire(&self, model: &str, version: u64, served: Arc<ServedVersion>, replaced: bool) {
        self.shared.queue.lock().push(Retiree {
            model: model.to_string(),
            version,
            served,
            replaced,
        });
        self.shared.changed.notify_all();
    }

    fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut queue = self.shared.queue.lock();
        while !queue.is_empty() {
            if self.shared.changed.wait_until(&mut queue, deadline).timed_out() {
                return queue.is_empty();
            }
        }
        true
    }
}

fn retire_loop(shared: Weak<RetireShared>, table: Weak<ArcSwap<ModelTable>>) {
    loop {
        let Some(shared) = shared.upgrade() else { return };
        let idle: Vec<Retiree> = {
            let mut queue = shared.queue.lock();
            if queue.is_empty() {
                // Woken by a retirement, or now and then to notice the manager has gone.
                shared.changed.wait_for(&mut queue, Duration::from_secs(1));
            } else {
                shared.changed.wait_for(&mut queue, RETIRE_CHECK);
            }
            let (idle, busy): (Vec<_>, Vec<_>) = std::mem::take(&mut *queue)
                .into_iter()
                .partition(|r| Arc::strong_count(&r.served) == 1);
            *queue = busy;
            idle
        };
        for retiree in idle {
            let Retiree {
                model,
                version,
                served,
                replaced,
            } = retiree;
            // Stops the scheduler (its queue is empty: nothing else held the version) and
            // frees the engine's model.
            drop(served);
            // Before the version shows as unloaded, so what it used is given back by then.
            crate::memory::release_freed_memory();
            tracing::info!(model = %model, version, "model version unloaded");
            if !replaced && let Some(table) = table.upgrade() {
                table.rcu(|t| {
                    let mut next = ModelTable::clone(t);
                    if let Some(record) = next.models.get_mut(&model)
                        && matches!(record.versions.get(&version), Some(VersionState::Unloading))
                    {
                        record.versions.insert(version, VersionState::Unloaded);
                    }
                    next
                });
            }
        }
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_paths_stay_inside_the_model_directory() {
        assert_eq!(
            safe_relative_path("1/model.onnx"),
            Some(PathBuf::from("1/model.onnx"))
        );
        assert_eq!(
            safe_relative_path("./1/model.onnx"),
            Some(PathBuf::from("1/model.onnx"))
        );
        assert_eq!(safe_relative_path("../x"), None);
        assert_eq!(safe_relative_path("1/../../x"), None);
        assert_eq!(safe_relative_path("/etc/passwd"), None);
        assert_eq!(safe_relative_path(""), None);
    }

    #[test]
    fn fingerprints_change_with_files_and_config_text() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("1")).unwrap();
        std::fs::write(dir.path().join("1/model.onnx"), b"abc").unwrap();
        std::fs::write(dir.path().join("config.pbtxt"), b"max_batch_size: 1").unwrap();
        let first = fingerprint_dir(dir.path());
        assert_eq!(first, fingerprint_dir(dir.path()));
        std::fs::write(dir.path().join("config.pbtxt"), b"max_batch_size: 2").unwrap();
        let second = fingerprint_dir(dir.path());
        assert_ne!(first, second);
        std::fs::write(dir.path().join("1/model.onnx"), b"abcd").unwrap();
        assert_ne!(second, fingerprint_dir(dir.path()));
        std::fs::create_dir(dir.path().join("2")).unwrap();
        let with_two = fingerprint_dir(dir.path());
        let config = oxserve_repository::pb::ModelConfig {
            instance_group: vec![oxserve_repository::pb::ModelInstanceGroup {
                count: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let key = |c: &oxserve_repository::pb::ModelConfig, v| {
            VersionKeys::of(c, &oxserve_repository::config_to_json(c), dir.path(), v)
        };
        let one = key(&config, 1);
        assert_ne!(one.load, key(&config, 2).load);
        let mut two_instances = config.clone();
        two_instances.instance_group[0].count = 2;
        let rescaled = key(&two_instances, 1);
        assert_ne!(one.load, rescaled.load);
        assert_eq!((one.files, one.shape), (rescaled.files, rescaled.shape));
        let mut other = config.clone();
        other.max_batch_size = 4;
        assert_ne!(one.shape, key(&other, 1).shape);
        assert_eq!(with_two, fingerprint_dir(dir.path()));
    }
}
