//! External data: initializers stored beside the model in `NAME_data`
//! files, as ONNX specifies (`location`, `offset`, `length` per tensor), so a
//! model can pass protobuf's 2 GiB limit.
//!
//! Files are named as transformers.js fetches them: `model_q4.onnx_data`,
//! then `model_q4.onnx_data_1`, ... Each chunk stays under 2 GiB (one browser
//! ArrayBuffer); tensors under 1 KiB stay inline, as onnx's own writer does;
//! each external tensor starts on a 4 KiB boundary so ONNX Runtime can map it.

use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::{self, StringStringEntryProto, tensor_proto::DataLocation};

/// protobuf's limit on one message.
pub const PROTOBUF_LIMIT: u64 = 2 << 30;
/// Tensors smaller than this stay inline.
pub const MIN_EXTERNAL_BYTES: usize = 1024;
/// The largest chunk file.
pub const CHUNK_BYTES: u64 = (2 << 30) - (64 << 20);
const ALIGN: u64 = 4096;

/// When initializers go to external data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Only when the model would pass 2 GiB.
    Auto,
    /// Always (every tensor of 1 KiB or more).
    Always,
}

/// What [`write`] wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Written {
    /// The `.onnx` file's size.
    pub model_bytes: u64,
    /// The external data files (name, bytes), in order.
    pub data_files: Vec<(String, u64)>,
}

impl Written {
    pub fn total_bytes(&self) -> u64 {
        self.model_bytes + self.data_files.iter().map(|(_, b)| b).sum::<u64>()
    }
}

/// The name of the `index`th data file of `model_file` (`model.onnx`).
pub fn data_file_name(model_file: &str, index: usize) -> String {
    if index == 0 {
        format!("{model_file}_data")
    } else {
        format!("{model_file}_data_{index}")
    }
}

/// Writes `model` to `path`, with its large initializers in data files
/// beside it when `policy` says so.
pub fn write(model: proto::ModelProto, path: &Path, policy: Policy) -> std::io::Result<Written> {
    write_chunked(model, path, policy, CHUNK_BYTES)
}

/// [`write`] with a chosen chunk size (tests use small ones).
pub fn write_chunked(
    mut model: proto::ModelProto,
    path: &Path,
    policy: Policy,
    chunk_bytes: u64,
) -> std::io::Result<Written> {
    let external = match policy {
        Policy::Always => true,
        Policy::Auto => model.encoded_len() as u64 >= PROTOBUF_LIMIT,
    };
    let mut written = Written::default();
    if external {
        let dir = path.parent().unwrap_or(Path::new("."));
        let file_name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            std::io::Error::other(format!("`{}` has no file name", path.display()))
        })?;
        let mut current: Option<(String, BufWriter<std::fs::File>, u64)> = None;
        let initializers = model
            .graph
            .as_mut()
            .map(|g| g.initializer.iter_mut())
            .into_iter()
            .flatten();
        for tensor in initializers {
            let Some(raw) = tensor
                .raw_data
                .take_if(|raw| raw.len() >= MIN_EXTERNAL_BYTES)
            else {
                continue;
            };
            let len = raw.len() as u64;
            // A new chunk when this tensor would not fit (a chunk holds at least one tensor).
            if current.as_ref().is_none_or(|(_, _, offset)| {
                *offset > 0 && offset.next_multiple_of(ALIGN) + len > chunk_bytes
            }) {
                if let Some((name, mut file, size)) = current.take() {
                    file.flush()?;
                    written.data_files.push((name, size));
                }
                let name = data_file_name(file_name, written.data_files.len());
                current = Some((
                    name.clone(),
                    BufWriter::with_capacity(1 << 20, std::fs::File::create(dir.join(&name))?),
                    0,
                ));
            }
            let (name, file, offset) = current.as_mut().expect("a chunk is open");
            let start = offset.next_multiple_of(ALIGN);
            file.write_all(&vec![0u8; (start - *offset) as usize])?;
            file.write_all(&raw)?;
            drop(raw);
            *offset = start + len;
            let entry = |key: &str, value: String| StringStringEntryProto {
                key: Some(key.to_string()),
                value: Some(value),
            };
            tensor.external_data = vec![
                entry("location", name.clone()),
                entry("offset", start.to_string()),
                entry("length", len.to_string()),
            ];
            tensor.data_location = Some(DataLocation::External as i32);
        }
        if let Some((name, mut file, size)) = current.take() {
            file.flush()?;
            written.data_files.push((name, size));
        }
    }
    written.model_bytes = super::write_model(model, path)?;
    Ok(written)
}

/// Reads a model and brings its external data inline. `locate` maps a
/// tensor's `location` to the file holding it (the model's folder joined
/// with it, for files on disk).
pub fn read(
    path: &Path,
    locate: impl Fn(&str) -> Option<PathBuf>,
) -> std::io::Result<proto::ModelProto> {
    let mut model = super::read_model(path)?;
    let mut open: Vec<(String, std::fs::File)> = Vec::new();
    for tensor in model
        .graph
        .as_mut()
        .map(|g| g.initializer.iter_mut())
        .into_iter()
        .flatten()
    {
        if tensor.data_location != Some(DataLocation::External as i32) {
            continue;
        }
        let name = tensor.name.clone().unwrap_or_default();
        let field = |key: &str| {
            tensor
                .external_data
                .iter()
                .find(|e| e.key.as_deref() == Some(key))
                .and_then(|e| e.value.clone())
        };
        let bad = |what: String| {
            std::io::Error::other(format!("`{}`: initializer `{name}` {what}", path.display()))
        };
        let location =
            field("location").ok_or_else(|| bad("is external but has no location".into()))?;
        if Path::new(&location)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad(format!(
                "has the location `{location}`, outside the model's folder"
            )));
        }
        let offset: u64 = field("offset")
            .map_or(Ok(0), |v| v.parse())
            .map_err(|_| bad("has an offset that is not a number".into()))?;
        let length: Option<u64> = field("length")
            .map(|v| v.parse())
            .transpose()
            .map_err(|_| bad("has a length that is not a number".into()))?;
        let index = match open.iter().position(|(l, _)| *l == location) {
            Some(i) => i,
            None => {
                let file_path = locate(&location)
                    .ok_or_else(|| bad(format!("is in `{location}`, which is missing")))?;
                let file = std::fs::File::open(&file_path)
                    .map_err(|e| bad(format!("is in `{}`: {e}", file_path.display())))?;
                open.push((location.clone(), file));
                open.len() - 1
            }
        };
        let file = &mut open[index].1;
        let length = match length {
            Some(l) => l,
            None => file.metadata()?.len().saturating_sub(offset),
        };
        let mut raw = vec![0u8; length as usize];
        file.seek(std::io::SeekFrom::Start(offset))?;
        file.read_exact(&mut raw).map_err(|e| {
            bad(format!(
                "cannot be read from `{location}` at {offset}+{length}: {e}"
            ))
        })?;
        tensor.raw_data = Some(raw.into());
        tensor.external_data.clear();
        tensor.data_location = None;
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> proto::ModelProto {
        let tensors = [
            ("big", 3000usize),
            ("small", 10),
            ("huge", 5000),
            ("mid", 2000),
        ];
        let initializer = tensors
            .iter()
            .map(|(n, len)| {
                super::super::tensor_f32(
                    n,
                    &[*len],
                    &(0..*len)
                        .map(|i| i as f32 + n.len() as f32)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        proto::ModelProto {
            graph: Some(proto::GraphProto {
                initializer,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn chunks_round_trip_and_small_tensors_stay_inline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model_q4.onnx");
        let written = write_chunked(model(), &path, Policy::Always, 24_000).unwrap();
        let names: Vec<&str> = written.data_files.iter().map(|(n, _)| n.as_str()).collect();
        // 12,000 + 20,000 + 8,000 bytes: each next tensor passes 24,000 after 4 KiB alignment.
        assert_eq!(
            names,
            [
                "model_q4.onnx_data",
                "model_q4.onnx_data_1",
                "model_q4.onnx_data_2"
            ]
        );
        for (name, bytes) in &written.data_files {
            assert!(
                *bytes <= 24_000
                    && std::fs::metadata(dir.path().join(name)).unwrap().len() == *bytes
            );
        }
        let stored = proto::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
        let small = stored
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some("small"))
            .unwrap();
        assert!(small.raw_data.is_some() && small.external_data.is_empty());
        for t in stored
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .filter(|t| t.name.as_deref() != Some("small"))
        {
            let offset: u64 = t
                .external_data
                .iter()
                .find(|e| e.key.as_deref() == Some("offset"))
                .unwrap()
                .value
                .as_ref()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(offset % ALIGN, 0);
        }
        let back = read(&path, |l| Some(dir.path().join(l))).unwrap();
        assert_eq!(back, model());
    }

    #[test]
    fn auto_keeps_a_small_model_in_one_file_and_locations_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        let written = write(model(), &path, Policy::Auto).unwrap();
        assert!(written.data_files.is_empty());
        let mut bad = model();
        bad.graph.as_mut().unwrap().initializer[0].data_location =
            Some(DataLocation::External as i32);
        bad.graph.as_mut().unwrap().initializer[0].external_data = vec![StringStringEntryProto {
            key: Some("location".into()),
            value: Some("../etc/passwd".into()),
        }];
        std::fs::write(&path, bad.encode_to_vec()).unwrap();
        let error = read(&path, |l| Some(dir.path().join(l)))
            .unwrap_err()
            .to_string();
        assert!(error.contains("outside the model's folder"), "{error}");
    }
}
