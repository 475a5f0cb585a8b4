//! The manifest of a backfill: one image per line, and which lines a shard scores.
//!
//! Lines are read as UTF-8. A byte-order mark at the start is skipped and a line may end in
//! CRLF (manifests written on Windows, or by Excel), and surrounding spaces are trimmed: no
//! path or URL a person means ends in a space, and a stray `\r` glued to a file name would
//! turn every line into "file not found". Blank lines and lines whose first non-space
//! character is `#` are skipped and belong to no shard.
//!
//! Shard rule: the k-th entry (counting only the lines that name an image, from 0) belongs to
//! shard `k mod COUNT`. Shards are disjoint and cover the manifest by construction, each holds
//! the same number of entries to one, and a shard is the same set on every run of the same
//! manifest. A hash of the line would also keep entries in place when lines are inserted, but
//! a changed manifest has another SHA-256 and invalidates every finished shard anyway (see
//! [`super`]), so the balanced rule costs nothing.

use std::{fmt, path::Path, str::FromStr};

use anyhow::Context;

/// Largest manifest read, in bytes: about ten million lines of a hundred characters.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// One shard of a manifest: `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, from 0.
    pub index: u32,
    /// How many shards the manifest is cut into, at least 1.
    pub count: u32,
}

impl Shard {
    /// The whole manifest as one shard.
    pub const WHOLE: Self = Self { index: 0, count: 1 };

    /// Whether the entry at `position` (among entries, from 0) belongs to this shard.
    pub fn holds(&self, position: usize) -> bool {
        position % self.count as usize == self.index as usize
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let err =
            |why: &str| format!("`{s}` is not a shard: {why}; write INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 0/4");
        let (index, count) = s.trim().split_once('/').ok_or_else(|| err("no `/`"))?;
        let number = |text: &str, name: &str| -> Result<u32, String> {
            text.trim().parse().map_err(|e: std::num::ParseIntError| match e.kind() {
                std::num::IntErrorKind::PosOverflow => err(&format!("{name} is too large (at most {})", u32::MAX)),
                _ => err(&format!("{name} is not a whole number")),
            })
        };
        let (index, count) = (number(index, "INDEX")?, number(count, "COUNT")?);
        if count == 0 {
            return Err(err("COUNT must be at least 1"));
        }
        if index >= count {
            return Err(err("INDEX must be below COUNT (shards count from 0)"));
        }
        Ok(Self { index, count })
    }
}

/// One line of the manifest that names an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its line number in the file, from 1 (comments and blank lines counted), so a row can be
    /// traced back to the line it came from.
    pub line: u64,
    /// The path or URL, trimmed.
    pub text: String,
}

/// A manifest read whole.
#[derive(Debug)]
pub struct Manifest {
    /// SHA-256 of the file's bytes, lowercase hex: what a finished shard is checked against.
    pub sha256: String,
    /// Every entry, in file order.
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes = crate::regular_file::read(path, MAX_MANIFEST_BYTES).map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                anyhow::anyhow!(
                    "the manifest {} is over the {MAX_MANIFEST_BYTES}-byte limit ({e}); split it into several \
                     manifests",
                    path.display()
                )
            } else {
                anyhow::anyhow!("cannot read the manifest {}: {e}; check --manifest", path.display())
            }
        })?;
        Self::parse(&bytes).with_context(|| format!("the manifest {}", path.display()))
    }

    /// Parses a manifest's bytes (see the module docs for the rules).
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        let sha256 = crate::digest::sha256_hex(bytes);
        let text = std::str::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("is not UTF-8 (byte {}); save it as UTF-8", e.valid_up_to()))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let entries = text
            .lines()
            .enumerate()
            .filter_map(|(i, l)| {
                let l = l.trim();
                (!l.is_empty() && !l.starts_with('#')).then(|| Entry { line: i as u64 + 1, text: l.to_owned() })
            })
            .collect();
        Ok(Self { sha256, entries })
    }

    /// The entries of `shard`, in file order.
    pub fn shard(&self, shard: Shard) -> Vec<&Entry> {
        self.entries.iter().enumerate().filter(|(k, _)| shard.holds(*k)).map(|(_, e)| e).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_refuse_with_the_fix() {
        assert_eq!("2/3".parse(), Ok(Shard { index: 2, count: 3 }));
        assert_eq!("0/1".parse(), Ok(Shard::WHOLE));
        for bad in ["3/3", "0/0", "1", "-1/3", "a/b", "1/"] {
            let e = bad.parse::<Shard>().unwrap_err();
            assert!(e.contains("INDEX/COUNT"), "{bad}: {e}");
        }
        let e = "99999999999999999999/1".parse::<Shard>().unwrap_err();
        assert!(e.contains("INDEX is too large"), "{e}");
    }

    #[test]
    fn bom_crlf_comments_and_blank_lines() {
        let m = Manifest::parse(b"\xef\xbb\xbfa.png\r\n\r\n  # note\r\n b.png \r\nhttp://h/c.png").unwrap();
        let got: Vec<(u64, &str)> = m.entries.iter().map(|e| (e.line, e.text.as_str())).collect();
        assert_eq!(got, [(1, "a.png"), (4, "b.png"), (5, "http://h/c.png")]);
        assert!(Manifest::parse(b"a\xff.png").is_err());
    }

    #[test]
    fn shards_are_disjoint_balanced_and_cover_the_manifest() {
        let text: String = (0..103).map(|i| format!("{i}.png\n# c\n")).collect();
        let m = Manifest::parse(text.as_bytes()).unwrap();
        let mut seen = Vec::new();
        for index in 0..4 {
            let s = m.shard(Shard { index, count: 4 });
            assert!((25..=26).contains(&s.len()));
            seen.extend(s.into_iter().map(|e| e.line));
        }
        seen.sort();
        assert_eq!(seen, m.entries.iter().map(|e| e.line).collect::<Vec<_>>());
    }
}
