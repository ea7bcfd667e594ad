//! Network namespaces: run a short piece of code (create or bind a socket) inside a pod's
//! network namespace, on the calling thread, and come back.
//!
//! A socket belongs to the namespace it was created in for its whole life, whichever thread
//! uses it later; so ztunnel enters a pod's namespace only for the `socket()`/`bind()` calls
//! and serves the pod from its ordinary runtime threads. `setns(CLONE_NEWNET)` changes the
//! calling thread only.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::sched::{CloneFlags, setns};

/// A network namespace held open by a file descriptor (from a path such as
/// `/var/run/netns/<name>` or `/proc/<pid>/ns/net`, or received over ZDS).
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
}

impl Netns {
    /// The namespace behind `fd`.
    pub fn from_fd(fd: OwnedFd) -> Netns {
        Netns { fd }
    }

    /// Opens the namespace at `path`.
    pub fn open(path: &Path) -> io::Result<Netns> {
        Ok(Netns {
            fd: File::open(path)?.into(),
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Netns> {
        Netns::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// The descriptor (to pass it on, e.g. over ZDS).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// A stable identity of the namespace: (device, inode) of its nsfs file.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        let st = nix::sys::stat::fstat(self.fd.as_fd()).map_err(io::Error::from)?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Runs `f` with the calling thread inside this namespace, then returns to the
    /// thread's previous namespace. If the return fails the thread would be left in the
    /// pod's namespace, serving other work from there: the process aborts instead, since
    /// nothing it does afterwards could be trusted to be in the right namespace.
    ///
    /// Calls must not nest (`f` must not call `run`): the thread returns to its own home
    /// namespace, not to the outer call's. The thread's own namespace is opened once per
    /// thread and kept (a proxy enters pod
    /// namespaces for every connection; opening `/proc/thread-self/ns/net` each time cost
    /// an open and a close per connection).
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> io::Result<R> {
        thread_local! {
            static HOME: std::cell::OnceCell<Netns> = const { std::cell::OnceCell::new() };
        }
        HOME.with(|home| {
            let home = match home.get() {
                Some(h) => h,
                None => {
                    let current = Netns::current()?;
                    home.get_or_init(|| current)
                }
            };
            setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let result = f();
            if let Err(e) = setns(home.fd.as_fd(), CloneFlags::CLONE_NEWNET) {
                tracing::error!(error = %e, "cannot return to the original network namespace; aborting");
                std::process::abort();
            }
            Ok(result)
        })
    }
}
