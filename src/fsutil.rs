//! Durable file writes: nothing the user had is lost or half-written.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A hidden sibling in the same directory (so `rename` stays atomic), marked
/// `.tmp-PID` so no other writer picks it and a later run can sweep it up; the
/// extension is kept for writers that infer the format from it.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    path.with_file_name(format!(".{stem}.tmp-{}{ext}", std::process::id()))
}

/// Flushes a directory entry so a rename inside it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot sync directory", dir.display()))
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| -> Result<()> {
        let mut f =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("{}: cannot sync", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("{}: cannot rename into place", path.display()))?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Reads a UTF-8 file, naming it in the error.
pub fn read_string(path: &Path) -> Result<String> {
    fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read as UTF-8 text", path.display()))
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}
