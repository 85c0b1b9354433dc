//! Token shards in llm.c's `.bin` layout.
//!
//! A 1024-byte header of 256 little-endian i32 — magic, version (1), token count —
//! then the tokens: u16 under magic 20240520, u32 under magic 20240801 (for
//! vocabularies larger than 65,535).

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC_U16: i32 = 20240520;
pub const MAGIC_U32: i32 = 20240801;
pub const VERSION: i32 = 1;
pub const HEADER_BYTES: usize = 256 * 4;

/// Bytes per token for a vocabulary of `vocab_size`.
pub fn token_width(vocab_size: usize) -> usize {
    if vocab_size > 65_535 {
        4
    } else {
        2
    }
}

/// A read-only, memory-mapped shard, validated on open.
pub struct TokenShard {
    path: PathBuf,
    map: Mmap,
    width: usize,
    len: usize,
}

impl TokenShard {
    /// Opens and validates a shard. With `vocab_size`, every token is checked to be
    /// below it, so a shard from another tokenizer is refused up front.
    pub fn open(path: &Path, vocab_size: Option<usize>) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("{}: cannot open token shard", path.display()))?;
        let file_len = file
            .metadata()
            .with_context(|| format!("{}: cannot stat", path.display()))?
            .len();
        ensure!(
            file_len >= HEADER_BYTES as u64,
            "{}: not a token shard: {} bytes, shorter than the 1024-byte header",
            path.display(),
            file_len
        );
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        let header = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().unwrap());
        let width = match header(0) {
            MAGIC_U16 => 2,
            MAGIC_U32 => 4,
            m => bail!(
                "{}: not a token shard: bad magic {m} (expected {MAGIC_U16} or {MAGIC_U32})",
                path.display()
            ),
        };
        ensure!(
            header(1) == VERSION,
            "{}: unsupported shard version {} (expected {VERSION})",
            path.display(),
            header(1)
        );
        let count = header(2);
        ensure!(
            count >= 0,
            "{}: corrupt header: negative token count {count}",
            path.display()
        );
        let expected = HEADER_BYTES as u64 + count as u64 * width as u64;
        ensure!(
            file_len == expected,
            "{}: truncated or corrupt: header says {count} tokens ({expected} bytes) but the file has {file_len} bytes",
            path.display()
        );
        let shard = TokenShard {
            path: path.to_path_buf(),
            map,
            width,
            len: count as usize,
        };
        if let Some(vocab) = vocab_size {
            if let Some((i, t)) = (0..shard.len)
                .map(|i| (i, shard.get(i)))
                .find(|&(_, t)| t as usize >= vocab)
            {
                bail!(
                    "{}: token {t} at position {i} is outside the vocabulary of {vocab}",
                    path.display()
                );
            }
        }
        Ok(shard)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token at position `i` (panics past the end, like slice indexing).
    pub fn get(&self, i: usize) -> u32 {
        assert!(
            i < self.len,
            "token index {i} past the end of {}",
            self.path.display()
        );
        let data = &self.map[HEADER_BYTES..];
        match self.width {
            2 => u16::from_le_bytes([data[2 * i], data[2 * i + 1]]) as u32,
            _ => u32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap()),
        }
    }

    /// Copies tokens `start..start+out.len()` into `out`.
    pub fn read_into(&self, start: usize, out: &mut [u32]) {
        for (k, slot) in out.iter_mut().enumerate() {
            *slot = self.get(start + k);
        }
    }

    /// Tokens `start..end` as a vector.
    pub fn slice(&self, start: usize, end: usize) -> Vec<u32> {
        let mut out = vec![0u32; end - start];
        self.read_into(start, &mut out);
        out
    }
}

/// Streams tokens into a shard: written to a temporary sibling, the header filled in
/// at the end, fsynced, then renamed into place. Dropped unfinished, it leaves nothing.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    vocab_size: usize,
    count: u64,
}

impl ShardWriter {
    pub fn create(path: &Path, vocab_size: usize) -> Result<Self> {
        let tmp = crate::fsutil::temp_sibling(path);
        let file =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_BYTES])?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(out),
            vocab_size,
            count: 0,
        })
    }

    pub fn write(&mut self, tokens: &[u32]) -> Result<()> {
        let out = self.out.as_mut().expect("writer open until finish");
        let wide = token_width(self.vocab_size) == 4;
        for &t in tokens {
            ensure!(
                (t as usize) < self.vocab_size,
                "token {t} is outside the vocabulary of {}",
                self.vocab_size
            );
            if wide {
                out.write_all(&t.to_le_bytes())?;
            } else {
                out.write_all(&(t as u16).to_le_bytes())?;
            }
        }
        self.count += tokens.len() as u64;
        ensure!(
            self.count <= i32::MAX as u64,
            "{}: more than {} tokens do not fit one shard's header",
            self.path.display(),
            i32::MAX
        );
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Writes the header and moves the shard into place.
    pub fn finish(mut self) -> Result<u64> {
        let mut out = self.out.take().expect("finish once");
        let magic = if token_width(self.vocab_size) == 4 {
            MAGIC_U32
        } else {
            MAGIC_U16
        };
        let mut header = [0i32; 256];
        header[0] = magic;
        header[1] = VERSION;
        header[2] = self.count as i32;
        let bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
        let ctx = || format!("{}: cannot write", self.tmp.display());
        out.flush().with_context(ctx)?;
        let mut file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(ctx)?;
        file.seek(SeekFrom::Start(0)).with_context(ctx)?;
        file.write_all(&bytes).with_context(ctx)?;
        file.sync_all().with_context(ctx)?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("{}: cannot rename into place", self.path.display()))?;
        crate::fsutil::sync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        Ok(self.count)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_shard(path: &Path, vocab: usize, tokens: &[u32]) {
        let mut w = ShardWriter::create(path, vocab).unwrap();
        w.write(tokens).unwrap();
        assert_eq!(w.finish().unwrap(), tokens.len() as u64);
    }

    #[test]
    fn round_trip_u16_and_u32() {
        let dir = tempfile::tempdir().unwrap();
        for (vocab, magic, width) in [(65_535usize, MAGIC_U16, 2usize), (100_000, MAGIC_U32, 4)] {
            let path = dir.path().join(format!("s{vocab}.bin"));
            let tokens: Vec<u32> = (0..5000u32).map(|i| (i * 7919) % vocab as u32).collect();
            write_shard(&path, vocab, &tokens);
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len(), HEADER_BYTES + tokens.len() * width);
            assert_eq!(i32::from_le_bytes(bytes[0..4].try_into().unwrap()), magic);
            assert_eq!(i32::from_le_bytes(bytes[4..8].try_into().unwrap()), 1);
            assert_eq!(i32::from_le_bytes(bytes[8..12].try_into().unwrap()), 5000);
            let shard = TokenShard::open(&path, Some(vocab)).unwrap();
            assert_eq!(shard.slice(0, shard.len()), tokens);
        }
    }

    #[test]
    fn header_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_shard(&path, 100, &[1, 2, 3, 99]);
        let good = std::fs::read(&path).unwrap();

        let err = |bytes: &[u8], vocab: Option<usize>| {
            std::fs::write(&path, bytes).unwrap();
            TokenShard::open(&path, vocab)
                .err()
                .expect("must fail")
                .to_string()
        };
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        assert!(err(&bad_magic, None).contains("bad magic"));
        assert!(err(&good[..good.len() - 1], None).contains("truncated"));
        assert!(err(&good[..100], None).contains("shorter than the 1024-byte header"));
        assert!(
            err(&good, Some(50)).contains("token 99 at position 3 is outside the vocabulary of 50")
        );
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(err(&huge, None).contains("truncated"));
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bin");
        {
            let mut w = ShardWriter::create(&path, 10).unwrap();
            w.write(&[1, 2]).unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut w = ShardWriter::create(&path, 10).unwrap();
        assert!(w.write(&[10]).is_err());
    }
}
