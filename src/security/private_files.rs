//! The files the daemon keeps beside its database (the database itself, its lock, the key
//! files) are private to the daemon's user: directories it creates are mode 0700, files 0600.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    path::Path,
};

/// Creates the directory `path` lies in (and its parents), mode 0700, when it does not exist.
pub fn create_parent_dir(path: &Path) -> io::Result<()> {
    let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Options for writing a file that, when created, is mode 0600; the caller adds `create`,
/// `create_new` or `truncate` as it needs.
pub fn write_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// How [`write_key_file`] treats an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFile {
    /// Fail if the file exists (a new key never overwrites one).
    CreateNew,
    /// Replace it atomically (written beside it, synced, then renamed over it).
    Replace,
}

/// Writes a key file, mode 0600 in a directory created 0700, synced to disk: the one writer
/// of every key file (the encryption key ring, the fingerprint key).
pub fn write_key_file(path: &Path, contents: &str, mode: KeyFile) -> io::Result<()> {
    create_parent_dir(path)?;
    // Beside the key file itself, so two key files never share one; created afresh, so its
    // mode is 0600 whatever a leftover from an interrupted rotation had.
    let temp = crate::config::beside(path, ".tmp");
    let mut options = write_options();
    options.create_new(true);
    let target = match mode {
        KeyFile::CreateNew => path,
        KeyFile::Replace => {
            match std::fs::remove_file(&temp) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
            &temp
        }
    };
    let mut file = options.open(target)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    if mode == KeyFile::Replace {
        std::fs::rename(&temp, path)?;
    }
    Ok(())
}
