//! Files that appear whole or not at all: written under a temporary name in the same folder,
//! flushed to disk, then renamed into place.
//!
//! A rename within one file system is atomic, so a reader (or a resumed backfill deciding
//! whether a shard is done) sees the old file or the complete new one, never half of either;
//! the fsyncs make the same true after a crash or a node losing power, not only after a killed
//! process. A temporary file left by a killed process is named `.NAME.PID.RANDOM.tmp` and is never
//! taken for the real file.

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

/// A file being written under a temporary name; [`AtomicFile::commit`] puts it in place.
/// Dropped without a commit, the temporary file is removed.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Starts writing what will become `path`. Only a regular file (or nothing) may be
    /// replaced: a `path` naming a device, a folder or a link is refused before anything is
    /// written, so `--out /dev/sda` cannot be renamed over.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_file() => {
                bail!("{} exists and is not a regular file; give --out a file path", path.display())
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot check {}: {e}", path.display()),
        }
        let name =
            path.file_name().with_context(|| format!("{} names no file; give --out a file path", path.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        // The process id alone is not unique: in containers it is often 1 in every pod, and two
        // pods of one Job index may overlap while one is being replaced.
        tmp_name.push(format!(".{}.{:08x}.tmp", std::process::id(), rand::random::<u32>()));
        let tmp = path.with_file_name(tmp_name);
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).with_context(|| {
            format!("cannot create {}; check that its folder exists and is writable", tmp.display())
        })?;
        Ok(Self { path: path.to_owned(), tmp, file: Some(file) })
    }

    /// The file being written.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("the file is held until commit")
    }

    /// Flushes the file to disk, renames it into place and flushes the folder, so the rename
    /// itself survives a crash.
    pub fn commit(mut self) -> anyhow::Result<()> {
        let file = self.file.take().expect("the file is held until commit");
        file.sync_all().with_context(|| format!("cannot flush {} to disk", self.tmp.display()))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot move {} to {}", self.tmp.display(), self.path.display()))?;
        let folder = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Some file systems cannot open a folder for sync; the rename has happened either way.
        if let Ok(dir) = File::open(folder) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `text` to `path` atomically (see the module docs).
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.file().write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_file_leaves_nothing_and_a_committed_one_replaces() {
        let dir = std::env::temp_dir().join(format!("qscore-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.txt");
        std::fs::write(&path, "old").unwrap();
        {
            let mut f = AtomicFile::create(&path).unwrap();
            f.file().write_all(b"half").unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "the temporary file was removed");
        write_atomically(&path, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert!(AtomicFile::create(&dir).is_err(), "a folder is never replaced");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
