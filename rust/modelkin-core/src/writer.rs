//! Streaming safetensors output: headers are known up front, tensor bytes are appended in order.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::encode::OutDtype;
use crate::error::{Error, Result};

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
    /// Header JSON of every shard file.
    headers: BTreeMap<String, Value>,
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
            let mut header = serde_json::Map::new();
            header.insert("__metadata__".to_string(), json!({"format": "pt"}));
            let mut offset = 0u64;
            for t in group {
                header.insert(
                    t.name.clone(),
                    json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + t.bytes()]}),
                );
                offset += t.bytes();
                shard_of.push(name.clone());
            }
            headers.insert(name.clone(), Value::Object(header));
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

    /// Starts tensor number `index` (tensors must come in the declared order).
    pub fn begin_tensor(&mut self, index: usize) -> Result<()> {
        let shard = self.shard_of[index].clone();
        if self.current.as_ref().is_some_and(|(name, _)| *name == shard) {
            return Ok(());
        }
        self.close_current()?;
        let path = self.directory.join(&shard);
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut header = serde_json::to_vec(&self.headers[&shard]).expect("JSON");
        header.resize(header.len().div_ceil(8) * 8, b' ');
        out.write_all(&(header.len() as u64).to_le_bytes()).map_err(|e| Error::io(&path, e))?;
        out.write_all(&header).map_err(|e| Error::io(&path, e))?;
        self.current = Some((shard, out));
        Ok(())
    }

    /// Appends bytes of the current tensor.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let (name, out) = self.current.as_mut().expect("begin_tensor first");
        out.write_all(bytes).map_err(|e| Error::io(self.directory.join(&*name), e))
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
