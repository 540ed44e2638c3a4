//! pprof's `profile.proto`, gzipped (`.pb.gz`): the heap profile format of
//! Go, jemalloc and every tool built on pprof (Pyroscope, Parca, Grafana).
//! Sample types are Go's: `alloc_objects`, `alloc_space`, `inuse_objects`,
//! `inuse_space` (the default). An unreferenced string carries heapbpf's
//! snapshot header,
//! so `report` and `diff` read these files back into the same snapshot.
use std::{
    collections::HashMap,
    io::{BufRead, Read, Write},
    path::Path,
    time::SystemTime,
};

use flate2::{read::GzDecoder, write::GzEncoder, Compression};
use prost::Message;
use serde::{Deserialize, Serialize};

use super::Limits;
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
    i64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_nanos()).ok()
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
            has_functions: !m.lacks_symbols(),
            has_filenames: !m.lacks_symbols(),
            has_line_numbers: !m.lacks_symbols(),
            has_inline_frames: !m.lacks_symbols(),
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
    let mut comment = vec![st.get(&format!(
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
    // pprof has no labels for a whole profile: the pod goes in a comment
    // (`go tool pprof -comments`); profile stores get it as series labels.
    if let Some(k) = &s.kubernetes {
        comment.push(st.get(&format!(
            "kubernetes namespace={} pod={} container={} node={} service_name={}",
            k.namespace, k.pod, k.container, k.node, k.service_name
        )));
    }

    let time_nanos = nanos(&s.taken_at).unwrap_or(0);
    // Times come from a snapshot file too: never wrap around.
    let duration_nanos = nanos(&s.attached_at).map_or(0, |a| time_nanos.saturating_sub(a).max(0));
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

/// Whether `bytes` (a file's first bytes) look like a gzipped (or raw)
/// pprof profile rather than JSON. A raw profile starts with field 1 (byte
/// 0x0a, a newline); JSON may start with a newline too, but then, past its
/// white space, comes `{` or `[`.
pub fn looks_like_pprof(bytes: &[u8]) -> bool {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return true;
    }
    bytes.first() == Some(&0x0a)
        && !matches!(
            bytes.iter().find(|b| !b" \t\r\n".contains(b)),
            Some(b'{' | b'[')
        )
}

/// Reads a pprof profile written by heapbpf back into a snapshot.
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Snapshot> {
    from_reader(path, bytes, &Limits::DEFAULT)
}

/// Reads a pprof profile, gzipped or not, as a stream: one top-level field
/// at a time, so neither the decompressed profile nor a gzip bomb is ever
/// held whole, and garbage is refused at its first field. Decompressed size
/// and decoded memory are bounded by `limits`.
pub fn from_reader(path: &Path, r: impl BufRead, limits: &Limits) -> Result<Snapshot> {
    let bad = |why: String| Error::BadSnapshot {
        path: path.to_path_buf(),
        why,
    };
    let mut r = r;
    let gzipped = r
        .fill_buf()
        .map_err(|e| bad(format!("cannot read: {e}")))?
        .starts_with(&[0x1f, 0x8b]);
    let mut budget = Budget::new(limits.pprof_memory_bytes);
    let p = if gzipped {
        // Buffered: the field keys and lengths are read a byte at a time.
        decode_profile(
            std::io::BufReader::new(GzDecoder::new(r)),
            limits.pprof_bytes,
            &mut budget,
        )
        .map_err(|e| bad(e.message("truncated or corrupt gzip data")))?
    } else {
        // Bounded by the size of the file.
        decode_profile(r, u64::MAX, &mut budget).map_err(|e| bad(e.message("cannot read")))?
    };
    to_snapshot(&p, &mut budget).map_err(bad)
}

/// A reader that counts what it gave.
struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Counted<R> {
    fn new(inner: R) -> Self {
        Counted { inner, bytes: 0 }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Memory a decoded profile may still take, charged as it is built.
struct Budget {
    left: u64,
    limit: u64,
}

impl Budget {
    fn new(limit: u64) -> Self {
        Budget { left: limit, limit }
    }
    fn charge(&mut self, bytes: u64) -> Result<(), String> {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(format!(
                "reading this profile would take more than {} of memory, the most heapbpf gives a snapshot; no heapbpf snapshot is that large",
                crate::units::size_label(self.limit)
            )),
        }
    }
}

/// Why decoding stopped.
enum DecodeError {
    /// The reader failed (gzip says so for corrupt data).
    Io(std::io::Error),
    /// The data ended inside a field.
    Truncated,
    /// More than the limit of decompressed data.
    TooBig(u64),
    /// Not protobuf, or not a `Profile`.
    Invalid(String),
    /// Over the memory budget.
    Memory(String),
}

impl DecodeError {
    fn message(self, io_context: &str) -> String {
        match self {
            DecodeError::Io(e) => format!("{io_context} ({e})"),
            DecodeError::Truncated => "truncated pprof profile; the file is incomplete".into(),
            DecodeError::TooBig(limit) => format!(
                "a gzip stream that expands to more than {}, over what heapbpf reads as a snapshot; no snapshot is that large (a gzip bomb?)",
                crate::units::size_label(limit)
            ),
            DecodeError::Invalid(why) => format!("not a pprof profile ({why})"),
            DecodeError::Memory(why) => why,
        }
    }
}

/// Reads a protobuf varint; `None` at a clean end of the data.
fn read_varint(r: &mut impl Read) -> Result<Option<u64>, DecodeError> {
    let mut value = 0u64;
    for i in 0..10 {
        let mut b = [0u8];
        loop {
            match r.read(&mut b) {
                Ok(0) if i == 0 => return Ok(None),
                Ok(0) => return Err(DecodeError::Truncated),
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DecodeError::Io(e)),
            }
        }
        value |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(Some(value));
        }
    }
    Err(DecodeError::Invalid("a varint longer than 10 bytes".into()))
}

fn push_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Reads exactly `n` bytes into `buf` (appended), growing it only as data
/// arrives, so that a length that lies costs nothing.
fn read_exact_into(r: &mut impl Read, n: u64, buf: &mut Vec<u8>) -> Result<(), DecodeError> {
    let got = r.take(n).read_to_end(buf).map_err(DecodeError::Io)? as u64;
    if got < n {
        return Err(DecodeError::Truncated);
    }
    Ok(())
}

/// Memory a top-level field of `len` bytes may take once decoded: its
/// struct, and at most 16 bytes for each byte of nested data (a 2-byte
/// label becomes a 32-byte struct, a 1-byte id an 8-byte one).
fn field_cost(field: u64, len: u64) -> u64 {
    let nested = len.saturating_mul(16);
    match field {
        // sample
        2 => 72u64.saturating_add(nested),
        // location (its lines)
        4 => 48u64.saturating_add(nested),
        // sample_type, mapping, function, period_type
        1 | 3 | 5 | 11 => 96,
        // string_table
        6 => 24u64.saturating_add(len),
        // comment, packed or not
        13 => 8u64.saturating_add(len.saturating_mul(8)),
        _ => 0,
    }
}

/// The fields of `Profile` that heapbpf reads; others are skipped unread.
const PROFILE_FIELDS: &[u64] = &[1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14];

/// Decodes a `Profile` one top-level field at a time from `r`, which may
/// give at most `max_bytes`.
fn decode_profile(
    r: impl Read,
    max_bytes: u64,
    budget: &mut Budget,
) -> Result<Profile, DecodeError> {
    let mut p = Profile::default();
    let mut field_buf = Vec::new();
    // Read at most one byte past the limit, to tell "at" from "over" it.
    let mut r = Counted::new(r.take(max_bytes.saturating_add(1)));
    let over = |r: &Counted<_>| r.bytes > max_bytes;
    let checked = |r: &Counted<_>, e: DecodeError| {
        if over(r) {
            DecodeError::TooBig(max_bytes)
        } else {
            e
        }
    };
    loop {
        let key = match read_varint(&mut r) {
            Ok(Some(k)) => k,
            Ok(None) => break,
            Err(e) => return Err(checked(&r, e)),
        };
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 {
            return Err(DecodeError::Invalid(
                "field number 0: not protobuf data".into(),
            ));
        }
        field_buf.clear();
        push_varint(&mut field_buf, key);
        let known = PROFILE_FIELDS.contains(&field);
        let len = match wire {
            0 => {
                let v = read_varint(&mut r)
                    .and_then(|v| v.ok_or(DecodeError::Truncated))
                    .map_err(|e| checked(&r, e))?;
                push_varint(&mut field_buf, v);
                0
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                read_exact_into(&mut r, n, &mut field_buf).map_err(|e| checked(&r, e))?;
                0
            }
            2 => {
                let len = read_varint(&mut r)
                    .and_then(|v| v.ok_or(DecodeError::Truncated))
                    .map_err(|e| checked(&r, e))?;
                if known {
                    push_varint(&mut field_buf, len);
                    read_exact_into(&mut r, len, &mut field_buf).map_err(|e| checked(&r, e))?;
                } else {
                    let skipped = std::io::copy(&mut (&mut r).take(len), &mut std::io::sink())
                        .map_err(|e| checked(&r, DecodeError::Io(e)))?;
                    if skipped < len {
                        return Err(checked(&r, DecodeError::Truncated));
                    }
                }
                len
            }
            other => {
                return Err(DecodeError::Invalid(format!(
                    "wire type {other} of field {field}"
                )))
            }
        };
        if over(&r) {
            return Err(DecodeError::TooBig(max_bytes));
        }
        if !known {
            continue;
        }
        budget
            .charge(field_cost(field, len))
            .map_err(DecodeError::Memory)?;
        p.merge(&*field_buf)
            .map_err(|e| DecodeError::Invalid(e.to_string()))?;
    }
    Ok(p)
}

/// The snapshot of a profile heapbpf wrote (its header and samples).
fn to_snapshot(p: &Profile, budget: &mut Budget) -> Result<Snapshot, String> {
    let bad = |why: String| why;
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
            // Each frame is its own copy of its names: pprof's ids let a
            // small profile stand for a great many of them.
            let frame_cost = |f: &Frame| {
                (std::mem::size_of::<Frame>()
                    + [&f.function, &f.file, &f.module]
                        .iter()
                        .map(|t| t.as_ref().map_or(0, String::len))
                        .sum::<usize>()) as u64
            };
            if loc.line.is_empty() {
                let frame = Frame {
                    address,
                    module: module.clone(),
                    ..Default::default()
                };
                budget.charge(frame_cost(&frame))?;
                frames.push(frame);
            }
            for (k, line) in loc.line.iter().enumerate() {
                let f = functions.get(&line.function_id);
                let frame = Frame {
                    address,
                    function: f.and_then(|f| opt(s(f.name))),
                    file: f.and_then(|f| opt(s(f.filename))),
                    line: u32::try_from(line.line).ok().filter(|&l| l > 0),
                    module: module.clone(),
                    inlined: k + 1 < loc.line.len(),
                };
                budget.charge(frame_cost(&frame))?;
                frames.push(frame);
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
        budget.charge(std::mem::size_of::<Stack>() as u64)?;
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
    for m in &mapping_list {
        budget.charge(
            (std::mem::size_of::<MappingInfo>() + s(m.filename).len() + s(m.build_id).len()) as u64,
        )?;
    }
    let snapshot = Snapshot {
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
                ..Default::default()
            })
            .collect(),
        // The JSON snapshot says what a windowed one covers; pprof does not.
        coverage: None,
        kubernetes: None,
    };
    super::check_figures(&snapshot)?;
    Ok(snapshot)
}

#[cfg(test)]
mod sniff_tests {
    use super::looks_like_pprof;

    #[test]
    fn json_that_starts_with_a_newline_is_not_pprof() {
        assert!(!looks_like_pprof(b"\n{\"format\": 1}"));
        assert!(!looks_like_pprof(b"\n \r\n\t[1]"));
        assert!(!looks_like_pprof(b"{}"));
        assert!(looks_like_pprof(&[0x1f, 0x8b, 0x08]));
        // Raw profiles: field 1, a length, then the sample type's fields
        // (a length that happens to be a white-space byte included).
        assert!(looks_like_pprof(&[0x0a, 0x04, 0x08, 0x01, 0x10, 0x02]));
        assert!(looks_like_pprof(&[0x0a, 0x0a, 0x08, 0x01, 0x10, 0x02]));
    }
}
