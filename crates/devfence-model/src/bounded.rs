//! The one bounded file read of devfence.
//!
//! Every file devfence reads — a sysfs attribute, the configuration, a tenancy
//! file, a key, an envelope, a pid file, a domain XML on standard input — goes
//! through [`read_opened`] (or [`read_file`] / [`read_stream`], which end in it):
//! the file is opened non-blocking (a FIFO planted where a file is expected never
//! blocks the open), checked with `fstat` to be a regular file, and read up to a
//! caller-given limit; one byte more is an error naming the path and the limit.
//! `devfence-host` opens files under a host root with its own containment
//! (`HostRoot::read_file`) and hands the open file here.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// A file could not be read within the rules.
#[derive(Debug, thiserror::Error)]
pub enum ReadFileError {
    /// The file could not be opened.
    #[error("Cannot open {path}")]
    Open {
        /// The path as shown to the operator.
        path: String,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// Something other than a regular file stands where a file is expected.
    #[error(
        "{path} is a {kind}, not a regular file. Hint: devfence reads only regular files here; replace it with the file it should be"
    )]
    NotRegular {
        /// The path as shown to the operator.
        path: String,
        /// What it is: `FIFO`, `directory`, `socket`, `character device`, …
        kind: &'static str,
    },
    /// The file holds more than the limit.
    #[error(
        "{path} is larger than {limit} bytes, the most devfence reads for it. Hint: this is not a file devfence wrote or expects; check it"
    )]
    TooLarge {
        /// The path as shown to the operator.
        path: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// Reading failed.
    #[error("Cannot read {path}")]
    Read {
        /// The path as shown to the operator.
        path: String,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
}

impl ReadFileError {
    /// Whether the file does not exist (an optional file may be absent).
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// The same error as an `io::Error` whose kind says what happened
    /// (`NotFound`, `InvalidInput` for a non-regular file, `FileTooLarge`), with
    /// this error as its message.
    #[must_use]
    pub fn into_io(self) -> io::Error {
        match self {
            Self::Open { source, .. } | Self::Read { source, .. } => source,
            Self::NotRegular { kind, .. } => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {kind}, not a regular file"),
            ),
            Self::TooLarge { limit, .. } => io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("larger than {limit} bytes"),
            ),
        }
    }
}

/// What a file type is called in an error.
#[must_use]
pub fn kind_name(t: std::fs::FileType) -> &'static str {
    if t.is_fifo() {
        "FIFO"
    } else if t.is_dir() {
        "directory"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens `path` for reading without blocking (`O_NONBLOCK`, close-on-exec),
/// following links: for files an operator names (a configuration, a key), not for
/// paths under a host root.
///
/// # Errors
/// [`ReadFileError::Open`].
pub fn open_nonblocking(path: &Path) -> Result<File, ReadFileError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits().cast_signed())
        .open(path)
        .map_err(|source| ReadFileError::Open {
            path: path.display().to_string(),
            source,
        })
}

/// Reads an open file: it must be a regular file (`fstat`), and at most `limit`
/// bytes are read; more is [`ReadFileError::TooLarge`]. `shown` names the file in
/// errors.
///
/// # Errors
/// [`ReadFileError::NotRegular`], [`ReadFileError::TooLarge`],
/// [`ReadFileError::Read`].
pub fn read_opened(file: &File, shown: &str, limit: u64) -> Result<Vec<u8>, ReadFileError> {
    let meta = file.metadata().map_err(|source| ReadFileError::Read {
        path: shown.to_owned(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(ReadFileError::NotRegular {
            path: shown.to_owned(),
            kind: kind_name(meta.file_type()),
        });
    }
    if meta.len() > limit {
        return Err(ReadFileError::TooLarge {
            path: shown.to_owned(),
            limit,
        });
    }
    // sysfs and procfs report sizes that are not the value's length (4096, 0):
    // the size only sizes the buffer, the read itself is what is bounded.
    let hint = usize::try_from(meta.len().min(limit).min(1 << 16)).unwrap_or(0);
    let mut out = Vec::with_capacity(hint);
    read_capped(file, shown, limit, &mut out)?;
    Ok(out)
}

/// Reads a stream (standard input) up to `limit` bytes; more is
/// [`ReadFileError::TooLarge`]. `shown` names the stream in errors.
///
/// # Errors
/// [`ReadFileError::TooLarge`], [`ReadFileError::Read`].
pub fn read_stream(r: impl Read, shown: &str, limit: u64) -> Result<Vec<u8>, ReadFileError> {
    let mut out = Vec::new();
    read_capped(r, shown, limit, &mut out)?;
    Ok(out)
}

fn read_capped(
    r: impl Read,
    shown: &str,
    limit: u64,
    out: &mut Vec<u8>,
) -> Result<(), ReadFileError> {
    let mut taken = r.take(limit.saturating_add(1));
    loop {
        match taken.read_to_end(out) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ReadFileError::Read {
                    path: shown.to_owned(),
                    source,
                });
            }
        }
    }
    if out.len() as u64 > limit {
        return Err(ReadFileError::TooLarge {
            path: shown.to_owned(),
            limit,
        });
    }
    Ok(())
}

/// Opens and reads the file an operator names at `path` ([`open_nonblocking`],
/// then [`read_opened`]).
///
/// # Errors
/// As [`open_nonblocking`] and [`read_opened`].
pub fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, ReadFileError> {
    let f = open_nonblocking(path)?;
    read_opened(&f, &path.display().to_string(), limit)
}

/// [`read_file`] as UTF-8 text; text that is not UTF-8 is a
/// [`ReadFileError::Read`] with kind `InvalidData`.
///
/// # Errors
/// As [`read_file`].
pub fn read_file_string(path: &Path, limit: u64) -> Result<String, ReadFileError> {
    let b = read_file(path, limit)?;
    String::from_utf8(b).map_err(|e| ReadFileError::Read {
        path: path.display().to_string(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_regular_files_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"12345").unwrap();
        assert_eq!(read_file(&p, 5).unwrap(), b"12345");
        let e = read_file(&p, 4).unwrap_err();
        assert!(matches!(e, ReadFileError::TooLarge { limit: 4, .. }), "{e}");
        assert!(e.to_string().contains("Hint:"), "{e}");
        assert!(
            read_file(&dir.path().join("nope"), 4)
                .unwrap_err()
                .is_not_found()
        );
    }

    #[test]
    fn a_fifo_or_a_directory_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = read_file(&p, 10).unwrap_err();
        assert!(
            matches!(e, ReadFileError::NotRegular { kind: "FIFO", .. }),
            "{e}"
        );
        let e = read_file(dir.path(), 10).unwrap_err();
        assert!(
            matches!(
                e,
                ReadFileError::NotRegular {
                    kind: "directory",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn an_endless_stream_stops_at_the_limit() {
        let e = read_stream(std::io::repeat(b'x'), "standard input", 1000).unwrap_err();
        assert!(
            matches!(e, ReadFileError::TooLarge { limit: 1000, .. }),
            "{e}"
        );
        assert_eq!(read_stream(&b"ab"[..], "x", 2).unwrap(), b"ab");
        // /dev/zero is a character device: refused before any read.
        let e = read_file(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(
            matches!(
                e,
                ReadFileError::NotRegular {
                    kind: "character device",
                    ..
                }
            ),
            "{e}"
        );
    }
}
