//! The embedded-default config source: a directory of YAML manifests (`--config-dir`).
//!
//! Every `*.yaml`/`*.yml` file below the directory is read (multi-document); a rescan reads
//! only files whose size or modification time changed and applies the difference to the
//! model. Nothing good is lost to a mistake:
//! - an object whose new version is invalid keeps its last good version in the model;
//! - a file that is not valid YAML keeps all its objects' last good versions;
//! - only an object that is really gone from its file (or whose file is gone) is deleted.
//!
//! The same object defined in two files: the file first in path order wins, with a warning.
//! [`watch`] rescans on a poll interval and applies a change once the directory has been
//! quiet for a debounce period, so an editor's save-in-several-steps is applied once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::load::{ConfigError, Document, Loaded, ObjectRef, parse_file};
use super::model::Model;

/// What one rescan did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Change {
    /// Objects added or replaced in the model.
    pub applied: Vec<ObjectRef>,
    /// Objects removed from the model.
    pub deleted: Vec<ObjectRef>,
    /// Documents that did not load (their objects keep their last good version).
    pub errors: Vec<ConfigError>,
    /// Unknown fields, skipped kinds, duplicate definitions.
    pub warnings: Vec<String>,
    /// Every error in the directory now, from this scan or earlier ones (files not fixed
    /// yet): what a status report shows.
    pub outstanding: Vec<ConfigError>,
    /// Unknown-field warnings of the objects in force now, by object: part of their status
    /// (a misspelt field of a security policy changes its meaning).
    pub object_warnings: BTreeMap<ObjectRef, Vec<String>>,
}

impl Change {
    /// Whether the model changed.
    pub fn changed(&self) -> bool {
        !self.applied.is_empty() || !self.deleted.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: SystemTime,
}

/// The directory source and what it has loaded so far.
#[derive(Debug)]
pub struct DirSource {
    root: PathBuf,
    stamps: BTreeMap<PathBuf, Stamp>,
    /// The objects each file provides now (last good versions included).
    by_file: BTreeMap<PathBuf, BTreeMap<ObjectRef, Loaded>>,
    /// The errors each file had when it was last read.
    errors_by_file: BTreeMap<PathBuf, Vec<ConfigError>>,
}

impl DirSource {
    /// A source reading below `root`.
    pub fn new(root: impl Into<PathBuf>) -> DirSource {
        DirSource {
            root: root.into(),
            stamps: BTreeMap::new(),
            by_file: BTreeMap::new(),
            errors_by_file: BTreeMap::new(),
        }
    }

    /// The directory read.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads what changed since the last scan and applies it to `model`.
    pub fn scan(&mut self, model: &mut Model) -> std::io::Result<Change> {
        let mut change = Change::default();
        let mut seen = BTreeMap::new();
        collect_yaml(&self.root, &mut seen)?;
        // The common case of a poll: nothing added, changed or removed. Return before any
        // object is looked at.
        if seen == self.stamps {
            return Ok(change);
        }
        let before = self.effective();

        // Files gone.
        let gone: Vec<PathBuf> = self
            .stamps
            .keys()
            .filter(|p| !seen.contains_key(*p))
            .cloned()
            .collect();
        for path in gone {
            self.stamps.remove(&path);
            self.by_file.remove(&path);
            self.errors_by_file.remove(&path);
        }
        // Files new or changed.
        for (path, stamp) in seen {
            if self.stamps.get(&path) == Some(&stamp) {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    // Unreadable now (being replaced, permissions): keep what it gave before
                    // and try again next scan.
                    change.warnings.push(format!(
                        "{}: cannot read: {e}; keeping its last good objects",
                        path.display()
                    ));
                    continue;
                }
            };
            self.stamps.insert(path.clone(), stamp);
            let previous = self.by_file.remove(&path).unwrap_or_default();
            let mut now = BTreeMap::new();
            let mut keep_all = false;
            let mut file_errors = Vec::new();
            for doc in parse_file(&path, &text) {
                match doc {
                    Document::Loaded(l) => {
                        change.warnings.extend(l.warnings.iter().cloned());
                        now.insert(l.id.clone(), l);
                    }
                    Document::Skipped(note) => change.warnings.push(note),
                    Document::Invalid(e) => {
                        match &e.id {
                            // The object keeps its last good version.
                            Some(id) => {
                                if let Some(old) = previous.get(id) {
                                    now.insert(id.clone(), old.clone());
                                }
                            }
                            // A document that cannot even be named (broken YAML): nothing
                            // in this file can be trusted to be gone.
                            None => keep_all = true,
                        }
                        change.errors.push(e.clone());
                        file_errors.push(e);
                    }
                }
            }
            if keep_all {
                for (id, old) in previous {
                    now.entry(id).or_insert(old);
                }
            }
            self.by_file.insert(path.clone(), now);
            if file_errors.is_empty() {
                self.errors_by_file.remove(&path);
            } else {
                self.errors_by_file.insert(path, file_errors);
            }
        }

        // Apply the difference of the effective objects.
        let after = self.effective();
        for (id, (file, loaded)) in &after {
            if before.get(id).map(|(_, l)| l) != Some(loaded) {
                model.apply(id, loaded.object.clone());
                change.applied.push(id.clone());
            }
            let others: Vec<String> = self
                .by_file
                .iter()
                .filter(|(f, objs)| *f != file && objs.contains_key(id))
                .map(|(f, _)| f.display().to_string())
                .collect();
            if !others.is_empty() {
                change.warnings.push(format!(
                    "{id} is defined in {} and also in {}; using {}",
                    file.display(),
                    others.join(", "),
                    file.display()
                ));
            }
        }
        for id in before.keys() {
            if !after.contains_key(id) {
                model.delete(id);
                change.deleted.push(id.clone());
            }
        }
        change.outstanding = self.errors();
        change.object_warnings = self.object_warnings();
        Ok(change)
    }

    /// Unknown-field warnings of the objects in force now (the first definition of each).
    pub fn object_warnings(&self) -> BTreeMap<ObjectRef, Vec<String>> {
        let mut out = BTreeMap::new();
        for objs in self.by_file.values() {
            for (id, l) in objs {
                if !out.contains_key(id) && !l.warnings.is_empty() {
                    out.insert(id.clone(), l.warnings.clone());
                }
            }
        }
        out
    }

    /// Every error in the directory now (files in path order).
    pub fn errors(&self) -> Vec<ConfigError> {
        self.errors_by_file.values().flatten().cloned().collect()
    }

    /// Each object with the file it comes from: the first file in path order.
    fn effective(&self) -> BTreeMap<ObjectRef, (PathBuf, Loaded)> {
        let mut out = BTreeMap::new();
        for (file, objs) in &self.by_file {
            for (id, l) in objs {
                out.entry(id.clone())
                    .or_insert_with(|| (file.clone(), l.clone()));
            }
        }
        out
    }

    /// The files read at the last scan.
    pub fn files(&self) -> BTreeSet<PathBuf> {
        self.stamps.keys().cloned().collect()
    }
}

fn collect_yaml(dir: &Path, out: &mut BTreeMap<PathBuf, Stamp>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        // Editors' and Kubernetes' hidden files (`.swp`, `..data`) are not manifests.
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = std::fs::metadata(&path)?; // follows symlinks (ConfigMap mounts)
        if meta.is_dir() {
            collect_yaml(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.insert(
                path,
                Stamp {
                    len: meta.len(),
                    modified: meta.modified()?,
                },
            );
        }
    }
    Ok(())
}

/// Polls `source` every `interval`; once a scan finds changes, waits until a scan finds
/// the directory unchanged for `quiet`, then hands the accumulated change to `on_change`.
/// Runs until `on_change` returns false.
pub async fn watch<F>(
    mut source: DirSource,
    mut model: Model,
    interval: Duration,
    quiet: Duration,
    mut on_change: F,
) where
    F: FnMut(&mut Model, Change) -> bool,
{
    let mut reported = source.errors();
    loop {
        tokio::time::sleep(interval).await;
        let mut total = match source.scan(&mut model) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(dir = %source.root().display(), error = %e, "cannot scan the config directory; keeping the current config");
                continue;
            }
        };
        // An edit that changes no object still matters when it adds or fixes an error.
        if !total.changed() && total.errors.is_empty() && source.errors() == reported {
            continue;
        }
        // Debounce: keep absorbing changes until the directory is quiet.
        loop {
            tokio::time::sleep(quiet).await;
            match source.scan(&mut model) {
                Ok(more) if more.changed() || !more.errors.is_empty() => {
                    total.applied.extend(more.applied);
                    total.deleted.extend(more.deleted);
                    total.errors.extend(more.errors);
                    total.warnings.extend(more.warnings);
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot scan the config directory");
                    break;
                }
            }
        }
        total.outstanding = source.errors();
        total.object_warnings = source.object_warnings();
        reported = total.outstanding.clone();
        if !on_change(&mut model, total) {
            return;
        }
    }
}
