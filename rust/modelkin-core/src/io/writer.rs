//! Streaming safetensors output: headers are known up front, tensor bytes are appended in order,
//! into shard files ([`ShardedWriter`]) or into one safetensors image in memory ([`MemoryWriter`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::io::encode::OutDtype;
use crate::io::error::{Error, Result};
use crate::io::model::{Model, OwnedBytes};

/// Where a merge's tensors go, in the order declared when the sink was made.
pub trait TensorSink: Send {
    /// Starts tensor number `index` (tensors must come in the declared order).
    fn begin_tensor(&mut self, index: usize) -> Result<()>;
    /// Appends bytes of the current tensor.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
}

/// A safetensors header for `tensors` stored back to back, with the 8-byte length in front and
/// padded with spaces to 8 bytes (so the data, and every tensor of one dtype, stays aligned).
fn header_bytes<'t>(tensors: impl IntoIterator<Item = &'t OutputTensor>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".to_string(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for t in tensors {
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + t.bytes()]}),
        );
        offset += t.bytes();
    }
    let mut text = serde_json::to_vec(&Value::Object(header)).expect("JSON");
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// One output tensor's place in the output files.
#[derive(Debug, Clone)]
pub struct OutputTensor {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Storage dtype.
    pub dtype: OutDtype,
}

impl OutputTensor {
    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// Writes tensors, in the order declared, into `model.safetensors` or
/// `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`.
pub struct ShardedWriter {
    directory: PathBuf,
    /// Shard file name of every tensor, in order.
    shard_of: Vec<String>,
    /// Header (length prefix included) of every shard file.
    headers: BTreeMap<String, Vec<u8>>,
    current: Option<(String, BufWriter<File>)>,
}

impl ShardedWriter {
    /// Plans the shards (a new one starts when `max_shard_bytes` would be exceeded) and writes
    /// the index file when there is more than one shard.
    pub fn create(directory: &Path, tensors: &[OutputTensor], max_shard_bytes: u64) -> Result<Self> {
        let mut groups: Vec<Vec<&OutputTensor>> = vec![Vec::new()];
        let mut size = 0u64;
        for t in tensors {
            let last = groups.last_mut().expect("at least one group");
            if !last.is_empty() && size + t.bytes() > max_shard_bytes {
                groups.push(Vec::new());
                size = 0;
            }
            groups.last_mut().expect("at least one group").push(t);
            size += t.bytes();
        }
        let count = groups.len();
        let names: Vec<String> = (1..=count)
            .map(|i| {
                if count == 1 {
                    "model.safetensors".to_string()
                } else {
                    format!("model-{i:05}-of-{count:05}.safetensors")
                }
            })
            .collect();
        let mut shard_of = Vec::with_capacity(tensors.len());
        let mut headers = BTreeMap::new();
        for (group, name) in groups.iter().zip(&names) {
            shard_of.extend(std::iter::repeat_n(name.clone(), group.len()));
            headers.insert(name.clone(), header_bytes(group.iter().copied()));
        }
        if count > 1 {
            let total: u64 = tensors.iter().map(OutputTensor::bytes).sum();
            let weight_map: serde_json::Map<String, Value> =
                tensors.iter().zip(&shard_of).map(|(t, s)| (t.name.clone(), json!(s))).collect();
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let path = directory.join("model.safetensors.index.json");
            std::fs::write(&path, serde_json::to_string_pretty(&index).expect("JSON"))
                .map_err(|e| Error::io(&path, e))?;
        }
        Ok(ShardedWriter { directory: directory.to_path_buf(), shard_of, headers, current: None })
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some((name, out)) = self.current.take() {
            let path = self.directory.join(name);
            let file = out.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Flushes and syncs the last shard.
    pub fn finish(mut self) -> Result<()> {
        self.close_current()
    }
}

impl TensorSink for ShardedWriter {
    fn begin_tensor(&mut self, index: usize) -> Result<()> {
        let shard = self.shard_of[index].clone();
        if self.current.as_ref().is_some_and(|(name, _)| *name == shard) {
            return Ok(());
        }
        self.close_current()?;
        let path = self.directory.join(&shard);
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&self.headers[&shard]).map_err(|e| Error::io(&path, e))?;
        self.current = Some((shard, out));
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let (name, out) = self.current.as_mut().expect("begin_tensor first");
        out.write_all(bytes).map_err(|e| Error::io(self.directory.join(&*name), e))
    }
}

/// Writes tensors, in the order declared, into one safetensors image in memory: the merged model
/// held by the process, readable as a [`Model`] without touching the disk.
pub struct MemoryWriter {
    bytes: OwnedBytes,
    /// Byte offset of every tensor's data in `bytes`.
    starts: Vec<usize>,
    cursor: usize,
}

impl MemoryWriter {
    /// Lays out the header and reserves the data (zeroed pages, mapped as they are written).
    pub fn create(tensors: &[OutputTensor]) -> Self {
        let header = header_bytes(tensors);
        let data: u64 = tensors.iter().map(OutputTensor::bytes).sum();
        let mut bytes = OwnedBytes::zeroed(header.len() + data as usize);
        bytes.bytes_mut()[..header.len()].copy_from_slice(&header);
        let mut starts = Vec::with_capacity(tensors.len());
        let mut offset = header.len();
        for t in tensors {
            starts.push(offset);
            offset += t.bytes() as usize;
        }
        MemoryWriter { bytes, starts, cursor: header.len() }
    }

    /// The finished model, named `label` in messages.
    pub fn finish(self, label: &str) -> Result<Model> {
        Model::from_memory(label, Arc::new(self.bytes))
    }
}

impl TensorSink for MemoryWriter {
    fn begin_tensor(&mut self, index: usize) -> Result<()> {
        self.cursor = self.starts[index];
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.bytes.bytes_mut()[self.cursor..self.cursor + bytes.len()].copy_from_slice(bytes);
        self.cursor += bytes.len();
        Ok(())
    }
}

/// Writes the tensors of `model` (all of them, in storage order) into `directory` as
/// `modelkin merge` writes them: one file, or shards of at most `max_shard_bytes` and an index.
pub fn save_model(model: &Model, directory: &Path, max_shard_bytes: u64) -> Result<u64> {
    let names = model.tensor_names();
    let mut outputs = Vec::with_capacity(names.len());
    for name in &names {
        let entry = model.tensor(name).expect("listed by the model");
        let dtype = OutDtype::from_safetensors(entry.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: model.path.clone(),
            tensor: name.to_string(),
            dtype: format!("{:?}", entry.dtype),
        })?;
        outputs.push(OutputTensor { name: name.to_string(), shape: entry.shape.clone(), dtype });
    }
    let mut writer = ShardedWriter::create(directory, &outputs, max_shard_bytes)?;
    let mut written = 0u64;
    for (index, name) in names.iter().enumerate() {
        let entry = model.tensor(name).expect("listed by the model");
        writer.begin_tensor(index)?;
        writer.write(model.shards[entry.shard].bytes(entry.start, entry.end))?;
        written += (entry.end - entry.start) as u64;
    }
    writer.finish()?;
    Ok(written)
}
