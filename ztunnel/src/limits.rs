//! Process limits ztunnel sets for itself at start (issue 17).
//!
//! **Open files**: ztunnel holds a descriptor per connection on each side (the pod's
//! socket, the HBONE or upstream socket) plus listeners in every enrolled pod's namespace,
//! so the soft `RLIMIT_NOFILE` (often 1,024) would be reached at a few hundred
//! connections. At start the soft limit is raised to the hard limit (what the kernel and
//! the container runtime allow; Kubernetes' default is 1,048,576) and both are reported.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The open-files limit before and after raising it: `(soft before, soft now, hard)`.
pub fn raise_nofile() -> nix::Result<(u64, u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (now, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok((soft, now, hard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        // Lower the soft limit first, so there is something to raise.
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let low = hard.min(512);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        let (before, now, max) = raise_nofile().unwrap();
        assert_eq!(before, low);
        assert_eq!((now, max), (hard, hard));
        // Opening more files than the old soft limit now works.
        if hard > low + 64 {
            let files: Vec<std::fs::File> = (0..low + 32)
                .map(|_| std::fs::File::open("/dev/null").unwrap())
                .collect();
            assert!(files.len() as u64 > low);
        }
    }
}
