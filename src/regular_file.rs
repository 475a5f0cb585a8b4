//! Opening a file a person named (a manifest, a manifest's image, a `--scores` or
//! `--predictions` file) for reading, without ever blocking on something that is not a file.
//!
//! Opening a FIFO for reading waits for a writer, forever if none comes, and a device or a
//! socket can do the same on read. So a path is checked to be a regular file first (following
//! links), then opened with `O_NONBLOCK` so a file swapped for a FIFO between the check and the
//! open still cannot block, and the opened handle is checked again. `O_NONBLOCK` changes nothing
//! when reading a regular file.

use std::{
    fs::{File, Metadata},
    io::{self, Read},
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::Path,
};

/// Opens `path` for reading if it is a regular file; answers the file and its metadata. Anything
/// else is an `InvalidInput` error saying what it is.
pub fn open(path: &Path) -> io::Result<(File, Metadata)> {
    check(&std::fs::metadata(path)?)?;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    check(&meta)?;
    Ok((file, meta))
}

/// Reads all of `path` if it is a regular file of at most `max` bytes; a longer one is an
/// `InvalidData` error (the file may have grown after its size was read: never reads past).
pub fn read(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let (file, meta) = open(path)?;
    let too_long = |len: u64| io::Error::new(io::ErrorKind::InvalidData, format!("it is {len} bytes, over {max}"));
    if meta.len() > max {
        return Err(too_long(meta.len()));
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_long(buf.len() as u64));
    }
    Ok(buf)
}

/// Whether `a` and `b` name the same file (same device and inode, links followed); false when
/// either cannot be read.
pub fn same(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn check(meta: &Metadata) -> io::Result<()> {
    let t = meta.file_type();
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file; name a regular file (copy a stream to a file first)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking_and_a_file_is_read() {
        let dir = std::env::temp_dir().join(format!("qscore-regular-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        let e = read(&fifo, 10).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        assert!(open(&dir).unwrap_err().to_string().contains("folder"));
        let file = dir.join("f.txt");
        std::fs::write(&file, "hello").unwrap();
        assert_eq!(read(&file, 5).unwrap(), b"hello");
        assert!(read(&file, 4).is_err());
        assert!(same(&file, &dir.join(".").join("f.txt")) && !same(&file, &fifo));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
