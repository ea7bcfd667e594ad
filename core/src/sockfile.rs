//! Unix socket files that only their owner can reach, from the moment they exist.
//!
//! `bind` creates the socket file with the process umask (typically 0755 / 0775 for a
//! socket: anyone may connect); a `chmod` afterwards leaves a window in which another local
//! user can connect. The ZDS socket hands out network-namespace descriptors and the CNI
//! socket enrolls pods, so neither may have that window. Here the socket is bound inside a
//! fresh directory only the owner can enter, made owner-only there, and then renamed into
//! place (a bound socket keeps working under its new name: connect resolves the path to the
//! same inode). The rename also replaces a stale socket of an earlier run atomically.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Binds a socket at `path` with `bind` (given the path to bind to), the file owner-only
/// (0600) before any other user could reach it.
pub fn bind_owner_only<T>(path: &Path, bind: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a socket path needs a file name",
        )
    })?;
    let private = private_dir(dir, name)?;
    let result = (|| {
        let staged = private.join(name);
        let bound = bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(bound)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// A new directory beside the socket that only the owner can enter (0700 at creation, not
/// after).
fn private_dir(dir: &Path, name: &std::ffi::OsStr) -> io::Result<PathBuf> {
    for attempt in 0..16u32 {
        let candidate = dir.join(format!(
            ".{}.{}.{attempt}",
            name.to_string_lossy(),
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => return Ok(candidate),
            // Left by a run that died with this pid: remove it and try again.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_dir_all(&candidate);
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "cannot create a private directory in {} for the socket",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn the_socket_is_owner_only_replaces_a_stale_one_and_accepts() {
        let dir = std::env::temp_dir().join(format!("trellis-sockfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("agent.sock");
        std::fs::create_dir_all(&dir).unwrap();
        // A stale socket of an earlier run, world-connectable.
        drop(UnixListener::bind(&path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();

        // The mode the socket has at bind time is what a racing user would see.
        let mut at_bind = None;
        let l = bind_owner_only(&path, |p| {
            let l = UnixListener::bind(p)?;
            at_bind = Some(std::fs::metadata(p.parent().unwrap())?.permissions().mode() & 0o777);
            Ok(l)
        })
        .unwrap();
        assert_eq!(at_bind, Some(0o700), "bound inside an owner-only directory");
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let _client = UnixStream::connect(&path).unwrap();
        l.accept().unwrap();
        // Nothing is left beside it.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("agent.sock")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
