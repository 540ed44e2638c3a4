//! pprof's `profile.proto`, gzipped (`.pb.gz`): the heap profile format of
//! Go, jemalloc and every tool built on pprof (Pyroscope, Parca, Grafana).
//! Sample types are Go's: `alloc_objects`, `alloc_space`, `inuse_objects`,
//! `inuse_space` (the default). An unreferenced string carries heapbpf's
//! snapshot header,
//! so `report` and `diff` read these files back into the same snapshot.
use std::{collections::HashMap, io::Read, io::Write, path::Path, time::SystemTime};

use flate2::{read::GzDecoder, write::GzEncoder, Compression};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    model::{
        Address, Frame, MappingInfo, Snapshot, Stack, Totals, Trigger, SNAPSHOT_FORMAT,
        SNAPSHOT_VERSION,
    },
};

/// `profile.proto`, the fields heapbpf writes and reads.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

use proto::*;

/// What makes two frames the same location.
type FrameKey = (
    Address,
    Option<String>,
    Option<String>,
    Option<u32>,
    Option<String>,
);

/// Prefix of the string that carries the snapshot header.
const HEADER_COMMENT: &str = "heapbpf-snapshot ";

/// Everything of a snapshot that is not stacks, as carried in the comment.
#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    pid: u32,
    comm: String,
    exe: String,
    taken_at: String,
    attached_at: String,
    trigger: Trigger,
    sample_bytes: u64,
    totals: Totals,
}

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Strings::default();
        s.get("");
        s
    }
    fn get(&mut self, v: &str) -> i64 {
        if let Some(&i) = self.index.get(v) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(v.to_string());
        self.index.insert(v.to_string(), i);
        i
    }
}

fn nanos(rfc3339: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339(rfc3339).ok()?;
    Some(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_nanos() as i64)
}

/// The profile of a snapshot.
pub fn to_profile(s: &Snapshot) -> Profile {
    let mut st = Strings::new();
    let vt = |st: &mut Strings, t: &str, u: &str| ValueType {
        r#type: st.get(t),
        unit: st.get(u),
    };
    let sample_type = vec![
        vt(&mut st, "alloc_objects", "count"),
        vt(&mut st, "alloc_space", "bytes"),
        vt(&mut st, "inuse_objects", "count"),
        vt(&mut st, "inuse_space", "bytes"),
    ];
    let mappings: Vec<Mapping> = s
        .mappings
        .iter()
        .enumerate()
        .map(|(i, m)| Mapping {
            id: i as u64 + 1,
            memory_start: m.start.0,
            memory_limit: m.limit.0,
            file_offset: m.offset.0,
            filename: st.get(&m.path),
            build_id: st.get(m.build_id.as_deref().unwrap_or("")),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        })
        .collect();
    let mapping_of = |addr: u64, module: Option<&str>| -> u64 {
        mappings
            .iter()
            .find(|m| m.memory_start <= addr && addr < m.memory_limit)
            .or_else(|| {
                module.and_then(|p| {
                    s.mappings
                        .iter()
                        .position(|m| m.path == p)
                        .map(|i| &mappings[i])
                })
            })
            .map_or(0, |m| m.id)
    };
    let mut functions: Vec<Function> = Vec::new();
    let mut function_ids: HashMap<(String, String), u64> = HashMap::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut location_ids: HashMap<Vec<FrameKey>, u64> = HashMap::new();
    let mut samples = Vec::new();
    let age_key = st.get("oldest_age_ms");
    let ms = st.get("ms");
    for stack in &s.stacks {
        let mut ids = Vec::new();
        // A truncated stack gets a root frame that says so (address 0, no
        // mapping), as in the folded and flame graph outputs.
        let frames = stack.frames_with_root();
        // Frames sharing an address are one location: inlined ones first.
        let mut i = 0;
        while i < frames.len() {
            let mut j = i + 1;
            while j < frames.len()
                && frames[j].address == frames[i].address
                && frames[j - 1].inlined
            {
                j += 1;
            }
            let group = &frames[i..j];
            let key: Vec<_> = group
                .iter()
                .map(|f| {
                    (
                        f.address,
                        f.function.clone(),
                        f.file.clone(),
                        f.line,
                        f.module.clone(),
                    )
                })
                .collect();
            let id = match location_ids.get(&key) {
                Some(&id) => id,
                None => {
                    let id = locations.len() as u64 + 1;
                    let lines = group
                        .iter()
                        .filter_map(|f| {
                            let name = f.function.as_deref()?;
                            let file = f.file.clone().unwrap_or_default();
                            let fid = *function_ids
                                .entry((name.to_string(), file.clone()))
                                .or_insert_with(|| {
                                    let id = functions.len() as u64 + 1;
                                    let n = st.get(name);
                                    functions.push(Function {
                                        id,
                                        name: n,
                                        system_name: n,
                                        filename: st.get(&file),
                                        start_line: 0,
                                    });
                                    id
                                });
                            Some(Line {
                                function_id: fid,
                                line: f.line.unwrap_or(0) as i64,
                            })
                        })
                        .collect();
                    let address = group[0].address.0;
                    locations.push(Location {
                        id,
                        mapping_id: mapping_of(address, group[0].module.as_deref()),
                        address,
                        line: lines,
                    });
                    location_ids.insert(key, id);
                    id
                }
            };
            ids.push(id);
            i = j;
        }
        samples.push(Sample {
            location_id: ids,
            value: vec![
                stack.allocations as i64,
                stack.allocated_bytes as i64,
                stack.live_allocations as i64,
                stack.live_bytes as i64,
            ],
            label: vec![Label {
                key: age_key,
                num: stack.oldest_age_ms as i64,
                num_unit: ms,
                str: 0,
            }],
        });
    }
    let header = Header {
        version: s.version,
        pid: s.pid,
        comm: s.comm.clone(),
        exe: s.exe.clone(),
        taken_at: s.taken_at.clone(),
        attached_at: s.attached_at.clone(),
        trigger: s.trigger,
        sample_bytes: s.sample_bytes,
        totals: s.totals.clone(),
    };
    // The header rides in the string table, referenced by nothing, so that
    // pprof does not print it; the comment is for people.
    st.get(&format!(
        "{HEADER_COMMENT}{}",
        serde_json::to_string(&header).unwrap_or_default()
    ));
    let comment = vec![st.get(&format!(
        "heapbpf snapshot of pid {} ({}), trigger {}, sampling {}",
        s.pid,
        s.comm,
        s.trigger.as_str(),
        if s.sample_bytes == 0 {
            "exact".to_string()
        } else {
            format!("every {} bytes", s.sample_bytes)
        }
    ))];

    let time_nanos = nanos(&s.taken_at).unwrap_or(0);
    let duration_nanos = nanos(&s.attached_at).map_or(0, |a| (time_nanos - a).max(0));
    let period_type = Some(vt(&mut st, "space", "bytes"));
    let default_sample_type = st.get("inuse_space");
    Profile {
        sample_type,
        sample: samples,
        mapping: mappings,
        location: locations,
        function: functions,
        string_table: st.table,
        time_nanos,
        duration_nanos,
        period_type,
        period: s.sample_bytes.max(1) as i64,
        comment,
        default_sample_type,
    }
}

pub fn to_bytes(s: &Snapshot) -> Vec<u8> {
    let raw = to_profile(s).encode_to_vec();
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    let _ = gz.write_all(&raw);
    gz.finish().unwrap_or_default()
}

/// Whether `bytes` look like a gzipped (or raw) pprof profile rather than JSON.
pub fn looks_like_pprof(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b]) || (!bytes.is_empty() && bytes[0] == 0x0a)
}

/// Reads a pprof profile written by heapbpf back into a snapshot.
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Snapshot> {
    let bad = |why: String| Error::BadSnapshot {
        path: path.to_path_buf(),
        why,
    };
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("truncated or corrupt gzip data ({e})")))?;
        out
    } else {
        bytes.to_vec()
    };
    let p = Profile::decode(&*raw).map_err(|e| bad(format!("not a pprof profile ({e})")))?;
    let s = |i: i64| p.string_table.get(i as usize).cloned().unwrap_or_default();
    let header: Header = p
        .string_table
        .iter()
        .find_map(|t| {
            t.strip_prefix(HEADER_COMMENT)
                .and_then(|h| serde_json::from_str(h).ok())
        })
        .ok_or_else(|| {
            bad(
                "a pprof profile, but not one written by heapbpf (no heapbpf-snapshot header)"
                    .into(),
            )
        })?;
    if header.version != SNAPSHOT_VERSION {
        return Err(bad(format!(
            "snapshot version {} is not supported (this heapbpf reads version {SNAPSHOT_VERSION})",
            header.version
        )));
    }
    let index: Vec<String> = p.sample_type.iter().map(|t| s(t.r#type)).collect();
    let col = |name: &str| index.iter().position(|n| n == name);
    let (ao, asp, io, isp) = match (
        col("alloc_objects"),
        col("alloc_space"),
        col("inuse_objects"),
        col("inuse_space"),
    ) {
        (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
        _ => return Err(bad("pprof profile lacks heapbpf's sample types".into())),
    };
    let functions: HashMap<u64, &Function> = p.function.iter().map(|f| (f.id, f)).collect();
    let mappings: HashMap<u64, &Mapping> = p.mapping.iter().map(|m| (m.id, m)).collect();
    let locations: HashMap<u64, &Location> = p.location.iter().map(|l| (l.id, l)).collect();
    let opt = |v: String| (!v.is_empty()).then_some(v);
    let mut stacks = Vec::new();
    for sample in &p.sample {
        let v = |i: usize| sample.value.get(i).copied().unwrap_or(0).max(0) as u64;
        let mut frames = Vec::new();
        for id in &sample.location_id {
            let loc = locations
                .get(id)
                .ok_or_else(|| bad(format!("sample refers to missing location {id}")))?;
            let module = mappings
                .get(&loc.mapping_id)
                .and_then(|m| opt(s(m.filename)));
            let address = Address(loc.address);
            if loc.line.is_empty() {
                frames.push(Frame {
                    address,
                    module: module.clone(),
                    ..Default::default()
                });
            }
            for (k, line) in loc.line.iter().enumerate() {
                let f = functions.get(&line.function_id);
                frames.push(Frame {
                    address,
                    function: f.and_then(|f| opt(s(f.name))),
                    file: f.and_then(|f| opt(s(f.filename))),
                    line: (line.line > 0).then_some(line.line as u32),
                    module: module.clone(),
                    inlined: k + 1 < loc.line.len(),
                });
            }
        }
        let oldest_age_ms = sample
            .label
            .iter()
            .find(|l| s(l.key) == "oldest_age_ms")
            .map_or(0, |l| l.num.max(0) as u64);
        let truncated = frames.last().is_some_and(crate::model::is_truncated_frame);
        if truncated {
            frames.pop();
        }
        stacks.push(Stack {
            truncated,
            live_bytes: v(isp),
            live_allocations: v(io),
            allocated_bytes: v(asp),
            allocations: v(ao),
            oldest_age_ms,
            frames,
        });
    }
    let mut mapping_list: Vec<&Mapping> = p.mapping.iter().collect();
    mapping_list.sort_by_key(|m| m.id);
    Ok(Snapshot {
        format: SNAPSHOT_FORMAT.into(),
        version: header.version,
        pid: header.pid,
        comm: header.comm,
        exe: header.exe,
        taken_at: header.taken_at,
        attached_at: header.attached_at,
        trigger: header.trigger,
        sample_bytes: header.sample_bytes,
        totals: header.totals,
        stacks,
        mappings: mapping_list
            .into_iter()
            .map(|m| MappingInfo {
                start: Address(m.memory_start),
                limit: Address(m.memory_limit),
                offset: Address(m.file_offset),
                path: s(m.filename),
                build_id: opt(s(m.build_id)),
            })
            .collect(),
    })
}
