//! Small facts read from ELF files (build ids), with the `object` crate.
use std::path::Path;

/// The GNU build id of an ELF file, as lowercase hex.
pub fn build_id(path: &Path) -> Option<String> {
    use object::Object;
    let data = std::fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let id = file.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}
