//! Text cleaning and bounded-memory chunking of input files.
//!
//! Cleaning is what every document goes through before tokenisation: valid UTF-8
//! (else an error naming the file and byte offset), Unicode NFC, CRLF and lone CR to
//! LF, control characters other than newline and tab removed, a leading BOM dropped.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;
use unicode_normalization::UnicodeNormalization;

/// Cleans one chunk of text. Chunks end after a newline, so NFC composition never
/// needs a character from the next chunk.
pub fn clean_text(text: &str) -> String {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut unified = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                unified.push('\n');
            }
            '\n' | '\t' => unified.push(c),
            c if c.is_control() => {}
            c => unified.push(c),
        }
    }
    unified.nfc().collect()
}

/// Checks that `bytes` (found at `offset` in `path`) are UTF-8.
pub fn validate_utf8<'a>(bytes: &'a [u8], path: &Path, offset: u64) -> Result<&'a str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => bail!(
            "{}: invalid UTF-8 at byte offset {}",
            path.display(),
            offset + e.valid_up_to() as u64
        ),
    }
}

/// Whether a chunk may end after the newline at `i`: the bytes around it are not
/// whitespace, so whitespace runs (which byte-level BPE pre-tokenises as a unit) are
/// never cut in two.
fn is_boundary(buf: &[u8], i: usize) -> bool {
    buf[i] == b'\n'
        && i > 0
        && i + 1 < buf.len()
        && !buf[i - 1].is_ascii_whitespace()
        && !buf[i + 1].is_ascii_whitespace()
}

/// Last position in `buf` where a chunk can end (exclusive end index) without
/// splitting a UTF-8 character: a clean boundary if there is one, else a newline,
/// else the last character boundary.
fn chunk_end(buf: &[u8]) -> usize {
    if let Some(i) = (0..buf.len()).rev().find(|&i| is_boundary(buf, i)) {
        return i + 1;
    }
    if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
        return i + 1;
    }
    // No newline at all: cut before the last UTF-8 lead byte so a character stays whole.
    (1..buf.len())
        .rev()
        .find(|&i| buf[i] & 0xC0 != 0x80)
        .unwrap_or(buf.len())
}

/// Reads `path` in chunks of about `target` bytes that end at safe boundaries and
/// hands each one, with its byte offset, to `f`. Memory stays bounded by ~2×target.
pub fn for_each_chunk(
    path: &Path,
    target: usize,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut buf: Vec<u8> = Vec::with_capacity(2 * target);
    let mut offset = 0u64;
    let mut block = vec![0u8; target];
    loop {
        let n = file
            .read(&mut block)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            if !buf.is_empty() {
                f(offset, &buf)?;
            }
            return Ok(());
        }
        buf.extend_from_slice(&block[..n]);
        if buf.len() >= target {
            let end = chunk_end(&buf);
            f(offset, &buf[..end])?;
            buf.drain(..end);
            offset += end as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_normalises_newlines_controls_and_nfc() {
        let raw = "\u{feff}a\r\nb\rc\u{7}d\te\u{1b}\n\u{0065}\u{0301}";
        assert_eq!(clean_text(raw), "a\nb\ncd\te\n\u{e9}");
    }

    #[test]
    fn chunks_cover_the_file_and_end_at_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        let text: String = (0..2000).map(|i| format!("line {i} é  x\n\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let mut joined = Vec::new();
        let mut count = 0;
        for_each_chunk(&path, 256, |off, chunk| {
            assert_eq!(off as usize, joined.len());
            assert!(std::str::from_utf8(chunk).is_ok());
            joined.extend_from_slice(chunk);
            count += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(joined, text.as_bytes());
        assert!(count > 10);
    }

    #[test]
    fn invalid_utf8_names_file_and_offset() {
        let err = validate_utf8(b"abc\xffdef", Path::new("x.txt"), 100).unwrap_err();
        assert_eq!(err.to_string(), "x.txt: invalid UTF-8 at byte offset 103");
    }
}
