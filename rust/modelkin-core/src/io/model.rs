//! A model on disk: one or more memory-mapped safetensors shards and the tensors they hold.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::SafeTensors;

use crate::io::dtype::FloatDtype;
use crate::io::error::{Error, Result};

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

/// Where one tensor's bytes live.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Index into [`Model::shards`].
    pub shard: usize,
    /// The dtype as written in the header.
    pub dtype: safetensors::Dtype,
    /// The shape as written in the header.
    pub shape: Vec<usize>,
    /// Byte range of the data within the shard file.
    pub start: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Bytes of finished tensors a shard keeps mapped before dropping them in one go: a drop costs a
/// system call and a TLB flush on every core running the pass, so dropping each tensor's pages
/// on its own cost ~5% of an 8-model matrix pass.
const RELEASE_BATCH: usize = 32 << 20;

/// The bytes of a safetensors file held in memory (a merge made without an output directory),
/// in 8-byte words so that every tensor of one float dtype is aligned for its element type.
#[derive(Debug)]
pub struct OwnedBytes {
    words: Vec<u64>,
    len: usize,
}

impl OwnedBytes {
    /// `len` zeroed bytes (the pages are mapped only when written).
    pub fn zeroed(len: usize) -> Self {
        OwnedBytes { words: vec![0u64; len.div_ceil(8)], len }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    /// The bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

/// Where a shard's bytes are: a read-only file mapping, or memory the process owns.
#[derive(Debug)]
enum Backing {
    Mapped(Mmap),
    Owned(Arc<OwnedBytes>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(mmap) => mmap,
            Backing::Owned(owned) => owned.bytes(),
        }
    }
}

/// One safetensors file: memory-mapped, or held in memory.
#[derive(Debug)]
pub struct Shard {
    /// The file's path (for a model in memory, the label it goes by in messages).
    pub path: PathBuf,
    backing: Backing,
    /// Released bytes not yet dropped: one contiguous range.
    pending: Mutex<Range<usize>>,
}

impl Shard {
    fn open(path: &Path) -> Result<(Self, Vec<(String, TensorEntry)>)> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated under us by another process would fault,
        // which every mmap-based reader (safetensors included) accepts.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // Pages not yet cached are then read into 2 MiB folios, which this and every later pass
        // maps with one entry each instead of 512. Only advice: without THP it changes nothing.
        #[cfg(target_os = "linux")]
        let _ = mmap.advise(memmap2::Advice::HugePage);
        Shard::read(path, Backing::Mapped(mmap))
    }

    fn read(path: &Path, backing: Backing) -> Result<(Self, Vec<(String, TensorEntry)>)> {
        let bytes = backing.bytes();
        let (header_len, metadata) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::invalid_file(path, header_error(&e, bytes.len())))?;
        let data_start = 8 + header_len;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (s, e) = info.data_offsets;
                let entry = TensorEntry {
                    shard: 0,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + s,
                    end: data_start + e,
                };
                (name, entry)
            })
            .collect();
        Ok((Shard { path: path.to_path_buf(), backing, pending: Mutex::new(0..0) }, tensors))
    }

    /// The bytes `start..end` of the file.
    pub fn bytes(&self, start: usize, end: usize) -> &[u8] {
        &self.backing.bytes()[start..end]
    }

    /// Marks a byte range the pass has finished with; its mapped pages are dropped with their
    /// neighbours once 32 MiB have gathered, so resident memory does not grow
    /// with model size. The page cache keeps the data.
    pub fn release(&self, start: usize, end: usize) {
        // Memory the process owns stays: it is the model.
        if end <= start || matches!(self.backing, Backing::Owned(_)) {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for range in gather(&mut pending, start..end, RELEASE_BATCH).into_iter().flatten() {
            self.drop_pages(&range);
        }
    }

    /// Drops the pages of every released range still gathering (the end of a pass: a model kept
    /// open for the next one holds none of them meanwhile).
    pub fn release_pending(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let range = std::mem::replace(&mut *pending, 0..0);
        self.drop_pages(&range);
    }

    fn drop_pages(&self, range: &Range<usize>) {
        if let (Backing::Mapped(mmap), false) = (&self.backing, range.is_empty()) {
            // SAFETY: the map is a read-only file mapping, so dropped pages are re-read from the
            // file on the next access and no borrowed slice ever observes different data.
            let _ =
                unsafe { mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len()) };
        }
    }
}

/// Adds `range` to the pending one and returns the ranges now due for dropping: the pending range
/// when `range` does not touch it, and the merged one once it reaches `batch` bytes.
fn gather(pending: &mut Range<usize>, range: Range<usize>, batch: usize) -> [Option<Range<usize>>; 2] {
    let mut due = [None, None];
    if pending.start < pending.end && range.start <= pending.end && pending.start <= range.end {
        *pending = pending.start.min(range.start)..pending.end.max(range.end);
    } else {
        due[0] = Some(std::mem::replace(pending, range)).filter(|r| r.start < r.end);
    }
    if pending.end - pending.start >= batch {
        due[1] = Some(std::mem::replace(pending, 0..0));
    }
    due
}

fn header_error(error: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match error {
        E::InvalidHeaderLength | E::HeaderTooLarge => {
            format!("header length points past the end of the file ({file_len} bytes)")
        }
        E::HeaderTooSmall => format!("file too short for a safetensors header ({file_len} bytes)"),
        E::MetadataIncompleteBuffer => {
            format!("tensor data does not match the file size ({file_len} bytes): truncated or padded file")
        }
        E::InvalidHeaderDeserialization(e) => format!("malformed header JSON: {e}"),
        E::InvalidOffset(name) => {
            format!("tensor '{name}': data offsets overlap, leave gaps or run out of bounds")
        }
        E::TensorInvalidInfo => "a tensor's byte size does not match its shape and dtype".to_string(),
        other => other.to_string(),
    }
}

/// A model: its shards and a name → location table of its tensors.
#[derive(Debug)]
pub struct Model {
    /// What the user passed (directory or file), used in messages.
    pub path: PathBuf,
    /// The mapped files.
    pub shards: Vec<Shard>,
    tensors: HashMap<String, TensorEntry>,
}

impl Model {
    /// Opens a directory (single file or shards + index) or a single `.safetensors` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let files = if metadata.is_dir() { shard_files(path)? } else { vec![single_file(path)?] };
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (file, listed) in files {
            let (shard, entries) = Shard::open(&file)?;
            let listed: Option<HashSet<String>> = listed.map(|names| names.into_iter().collect());
            for (name, mut entry) in entries {
                if listed.as_ref().is_some_and(|names| !names.contains(&name)) {
                    continue;
                }
                entry.shard = shards.len();
                tensors.insert(name, entry);
            }
            if let Some(missing) = listed.iter().flatten().find(|n| !tensors.contains_key(*n)) {
                return Err(Error::invalid_file(
                    &shard.path,
                    format!("tensor '{missing}' is listed in {INDEX_FILE} but not stored in this shard"),
                ));
            }
            shards.push(shard);
        }
        Ok(Model { path: path.to_path_buf(), shards, tensors })
    }

    /// A model held in memory: `bytes` is one safetensors file, `label` names it in messages.
    pub fn from_memory(label: impl Into<PathBuf>, bytes: Arc<OwnedBytes>) -> Result<Self> {
        let label = label.into();
        let (shard, entries) = Shard::read(&label, Backing::Owned(bytes))?;
        Ok(Model { path: label, shards: vec![shard], tensors: entries.into_iter().collect() })
    }

    /// Some of this model's tensors under other names: `names` lists (new name, name here). The
    /// files are mapped again (or the bytes in memory shared), nothing is copied; `label` names the
    /// view in messages. A VLM's language model seen under its text architecture's names.
    pub fn view(&self, label: &str, names: &[(String, String)]) -> Result<Model> {
        let shards = self
            .shards
            .iter()
            .map(|shard| {
                let backing = match &shard.backing {
                    Backing::Owned(bytes) => Backing::Owned(Arc::clone(bytes)),
                    Backing::Mapped(_) => {
                        let file = File::open(&shard.path).map_err(|e| Error::io(&shard.path, e))?;
                        // SAFETY: as in `Shard::open`.
                        Backing::Mapped(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&shard.path, e))?)
                    }
                };
                Ok(Shard { path: shard.path.clone(), backing, pending: Mutex::new(0..0) })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut tensors = HashMap::with_capacity(names.len());
        for (new, old) in names {
            let entry = self
                .tensors
                .get(old)
                .ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: old.clone() })?;
            tensors.insert(new.clone(), entry.clone());
        }
        Ok(Model { path: PathBuf::from(label), shards, tensors })
    }

    /// This model with the tensors of `changed` (a model in memory, of the same names and shapes)
    /// read from `changed` instead: an adapter applied to its base. `label` names it in messages.
    pub fn overlaid(mut self, label: &str, changed: Model) -> Model {
        let first = self.shards.len();
        for (name, mut entry) in changed.tensors {
            entry.shard += first;
            self.tensors.insert(name, entry);
        }
        self.shards.extend(changed.shards);
        self.path = PathBuf::from(label);
        self
    }

    /// The in-memory bytes of a model made by [`Model::from_memory`].
    pub fn memory(&self) -> Option<&Arc<OwnedBytes>> {
        match self.shards.as_slice() {
            [Shard { backing: Backing::Owned(bytes), .. }] => Some(bytes),
            _ => None,
        }
    }

    /// Whether `other` is this very model: the same files on disk, or the same bytes in memory.
    pub fn same_as(&self, other: &Model) -> bool {
        match (self.memory(), other.memory()) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => {
                let canonical = |m: &Model| std::fs::canonicalize(&m.path).unwrap_or_else(|_| m.path.clone());
                canonical(self) == canonical(other)
            }
            _ => false,
        }
    }

    /// Lets the mapped pages of a finished tensor go (they are dropped in batches, see
    /// [`Shard::release`]).
    pub fn release(&self, entry: &TensorEntry) {
        self.shards[entry.shard].release(entry.start, entry.end);
    }

    /// Drops the pages of every finished tensor not yet dropped (see [`Shard::release_pending`]).
    pub fn release_pending(&self) {
        self.shards.iter().for_each(Shard::release_pending);
    }

    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// Tensor names in storage order (shard, then offset), so a pass reads each file front to back.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<(&str, &TensorEntry)> =
            self.tensors.iter().map(|(n, e)| (n.as_str(), e)).collect();
        names.sort_by_key(|(_, e)| (e.shard, e.start));
        names.into_iter().map(|(n, _)| n).collect()
    }

    /// The file holding a tensor.
    pub fn file_of(&self, entry: &TensorEntry) -> &Path {
        &self.shards[entry.shard].path
    }

    /// The tensor's dtype, if it is a float format modelkin decodes.
    pub fn float_dtype(&self, name: &str, entry: &TensorEntry) -> Result<FloatDtype> {
        FloatDtype::from_safetensors(entry.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: self.file_of(entry).to_path_buf(),
            tensor: name.to_string(),
            dtype: format!("{:?}", entry.dtype),
        })
    }

    /// The stored bytes of `count` elements starting at element `first` of a tensor.
    pub fn raw_bytes(&self, entry: &TensorEntry, dtype: FloatDtype, first: usize, count: usize) -> &[u8] {
        let start = entry.start + first * dtype.size();
        self.shards[entry.shard].bytes(start, start + count * dtype.size())
    }

    /// Widens `count` elements starting at element `first` of a tensor into `out`.
    pub fn read_f64(&self, entry: &TensorEntry, dtype: FloatDtype, first: usize, out: &mut [f64]) {
        let size = dtype.size();
        let start = entry.start + first * size;
        crate::io::dtype::decode(dtype, self.shards[entry.shard].bytes(start, start + out.len() * size), out);
    }
}

/// A shard file and, when an index names them, the tensors it is authoritative for.
type ShardPlan = (PathBuf, Option<Vec<String>>);

fn single_file(path: &Path) -> Result<ShardPlan> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok((path.to_path_buf(), None)),
        Some("bin" | "pt" | "pth" | "ckpt") => Err(pickle_refused(path)),
        _ => Err(Error::UnsupportedFormat {
            path: path.to_path_buf(),
            reason: "not a .safetensors file".to_string(),
        }),
    }
}

fn pickle_refused(path: &Path) -> Error {
    Error::UnsupportedFormat {
        path: path.to_path_buf(),
        reason: "PyTorch pickle checkpoints are refused (loading pickle can run arbitrary code); convert once \
                 with `transformers`: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            .to_string(),
    }
}

fn shard_files(dir: &Path) -> Result<Vec<ShardPlan>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        return index_shards(dir, &index);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![(single, None)]);
    }
    let mut found = Vec::new();
    let mut pickles = false;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => found.push((path, None)),
            Some("bin" | "pt" | "pth") => pickles = true,
            _ => {}
        }
    }
    if found.is_empty() {
        return Err(if pickles {
            pickle_refused(dir)
        } else {
            Error::UnsupportedFormat {
                path: dir.to_path_buf(),
                reason: "no .safetensors files in this directory".to_string(),
            }
        });
    }
    found.sort();
    Ok(found)
}

fn index_shards(dir: &Path, index: &Path) -> Result<Vec<ShardPlan>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid_file(index, format!("malformed JSON: {e}")))?;
    let weight_map = json
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| Error::invalid_file(index, "no 'weight_map' object"))?;
    let mut by_file: Vec<ShardPlan> = Vec::new();
    for (tensor, file) in weight_map {
        let file = file
            .as_str()
            .ok_or_else(|| Error::invalid_file(index, format!("tensor '{tensor}' maps to a non-string")))?;
        let path = dir.join(file);
        match by_file.iter_mut().find(|(p, _)| *p == path) {
            Some((_, names)) => names.get_or_insert_with(Vec::new).push(tensor.clone()),
            None => by_file.push((path, Some(vec![tensor.clone()]))),
        }
    }
    by_file.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, names) in &by_file {
        if !path.is_file() {
            let first = names.as_ref().and_then(|n| n.first()).map(String::as_str).unwrap_or("?");
            return Err(Error::invalid_file(
                index,
                format!("shard {} (holding tensor '{first}') does not exist", path.display()),
            ));
        }
    }
    Ok(by_file)
}

#[cfg(test)]
mod tests {
    use super::gather;

    #[test]
    fn released_ranges_gather_until_a_batch_is_due() {
        let mut pending = 0..0;
        assert_eq!(gather(&mut pending, 100..200, 200), [None, None]);
        // Adjacent and overlapping ranges merge; the batch falls due at 200 bytes.
        assert_eq!(gather(&mut pending, 200..300, 200), [None, Some(100..300)]);
        assert_eq!(pending, 0..0);
        assert_eq!(gather(&mut pending, 400..500, 200), [None, None]);
        assert_eq!(gather(&mut pending, 450..520, 200), [None, None]);
        // A range elsewhere (another tensor order) drops what gathered first.
        assert_eq!(gather(&mut pending, 0..50, 200), [Some(400..520), None]);
        assert_eq!(pending, 0..50);
        assert_eq!(gather(&mut pending, 60..400, 200), [Some(0..50), Some(60..400)]);
    }
}
