//! ZDS, the node agent → ztunnel protocol (wire-compatible with Istio's): a unix
//! `SOCK_SEQPACKET` socket, one protobuf message per packet, a pod's network namespace
//! passed along an `AddWorkload` as a file descriptor (`SCM_RIGHTS`), one `Ack` per
//! request.
//!
//! ztunnel connects and says `ZdsHello`; the agent (the server) then sends an `add` for
//! every pod ztunnel should serve, `snapshot_sent`, and from then on changes. Each side
//! bounds what it reads: a packet longer than [`MAX_MESSAGE`] or carrying more than one
//! descriptor is an error for that message, never a crash.

// Receiving descriptors over SCM_RIGHTS and adopting an accepted socket take ownership of
// raw file descriptors, which is `unsafe` in Rust; each block says why it is sound.
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept4, bind, connect, listen, recvmsg, sendmsg, socket,
};
use prost::Message;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use trellis_proto::istio::workload::zds::{
    Ack, WorkloadRequest, WorkloadResponse, ZdsHello, workload_response,
};

/// Longest message accepted (Istio's ztunnel reads 1 KiB; names are short).
pub const MAX_MESSAGE: usize = 4096;

/// What can go wrong on a ZDS socket.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// The socket failed.
    #[error("ZDS socket: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("the ZDS peer closed the connection")]
    Closed,
    /// A packet that is not a valid message.
    #[error("invalid ZDS message: {0}")]
    Invalid(String),
}

/// One end of a ZDS connection.
#[derive(Debug)]
pub struct ZdsSocket {
    fd: AsyncFd<OwnedFd>,
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` owns an open descriptor until it is dropped, which happens only
    // when the `AsyncFd` (and so its registration) goes away; its raw value never changes.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn seqpacket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

impl ZdsSocket {
    /// Connects to the agent's socket at `path`.
    pub fn connect(path: &Path) -> io::Result<ZdsSocket> {
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(io::Error::from)?;
        connect(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
        Ok(ZdsSocket { fd: register(fd)? })
    }

    /// A connected pair (tests).
    pub fn pair() -> io::Result<(ZdsSocket, ZdsSocket)> {
        let (a, b) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        Ok((
            ZdsSocket { fd: register(a)? },
            ZdsSocket { fd: register(b)? },
        ))
    }

    /// Sends one packet, with `fd` attached when given.
    pub async fn send_raw(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            let mut guard = self.fd.ready(Interest::WRITABLE).await?;
            let iov = [IoSlice::new(bytes)];
            let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
                Vec::new()
            } else {
                vec![ControlMessage::ScmRights(&fds)]
            };
            match sendmsg::<()>(
                self.fd.get_ref().as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one packet and the descriptors attached to it. A packet longer than
    /// [`MAX_MESSAGE`], or with more descriptors than fit, is an error (the descriptors
    /// that did arrive are closed).
    pub async fn recv_raw(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), ZdsError> {
        loop {
            let mut guard = self.fd.ready(Interest::READABLE).await?;
            let mut buf = vec![0u8; MAX_MESSAGE];
            let mut cmsg = nix::cmsg_space!([RawFd; 2]);
            let result = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                recvmsg::<()>(
                    self.fd.get_ref().as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map(|m| {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = m.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(raw) = c {
                                for fd in raw {
                                    // SAFETY: the kernel installed `fd` in this process
                                    // for this message (SCM_RIGHTS); nothing else owns
                                    // it, so it is adopted exactly once here.
                                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                                }
                            }
                        }
                    }
                    (m.bytes, m.flags, fds)
                })
            };
            match result {
                Ok((0, _, _)) => return Err(ZdsError::Closed),
                Ok((n, flags, fds)) => {
                    if flags.contains(MsgFlags::MSG_TRUNC) {
                        return Err(ZdsError::Invalid(format!(
                            "message longer than {MAX_MESSAGE} bytes"
                        )));
                    }
                    if flags.contains(MsgFlags::MSG_CTRUNC) {
                        return Err(ZdsError::Invalid(
                            "too many file descriptors attached".into(),
                        ));
                    }
                    buf.truncate(n);
                    return Ok((buf, fds));
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(ZdsError::Io(e.into())),
            }
        }
    }

    /// Sends the hello (ztunnel's first message).
    pub async fn send_hello(&self) -> io::Result<()> {
        let hello = ZdsHello {
            version: trellis_proto::istio::workload::zds::Version::V1 as i32,
        };
        self.send_raw(&hello.encode_to_vec(), None).await
    }

    /// Receives the hello.
    pub async fn recv_hello(&self) -> Result<ZdsHello, ZdsError> {
        let (bytes, _fds) = self.recv_raw().await?;
        ZdsHello::decode(bytes.as_slice()).map_err(|e| ZdsError::Invalid(e.to_string()))
    }

    /// Sends a request, with the pod's netns for an `add`.
    pub async fn send_request(
        &self,
        req: &WorkloadRequest,
        netns: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        self.send_raw(&req.encode_to_vec(), netns).await
    }

    /// Receives a request and the descriptor that came with it (at most one is kept; extra
    /// ones are closed).
    pub async fn recv_request(&self) -> Result<(WorkloadRequest, Option<OwnedFd>), ZdsError> {
        let (bytes, mut fds) = self.recv_raw().await?;
        if fds.len() > 1 {
            return Err(ZdsError::Invalid(format!(
                "{} file descriptors attached; at most one (the pod's netns) is expected",
                fds.len()
            )));
        }
        let req = WorkloadRequest::decode(bytes.as_slice())
            .map_err(|e| ZdsError::Invalid(format!("not a WorkloadRequest: {e}")))?;
        if req.payload.is_none() {
            return Err(ZdsError::Invalid("WorkloadRequest without payload".into()));
        }
        Ok((req, fds.pop()))
    }

    /// Sends an Ack: empty `error` means done.
    pub async fn send_ack(&self, error: &str) -> io::Result<()> {
        let resp = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.to_string(),
            })),
        };
        self.send_raw(&resp.encode_to_vec(), None).await
    }

    /// Receives an Ack: `Ok(Ok(()))` done, `Ok(Err(reason))` refused by the peer.
    pub async fn recv_ack(&self) -> Result<Result<(), String>, ZdsError> {
        let (bytes, _fds) = self.recv_raw().await?;
        let resp = WorkloadResponse::decode(bytes.as_slice())
            .map_err(|e| ZdsError::Invalid(format!("not a WorkloadResponse: {e}")))?;
        match resp.payload {
            Some(workload_response::Payload::Ack(a)) if a.error.is_empty() => Ok(Ok(())),
            Some(workload_response::Payload::Ack(a)) => Ok(Err(a.error)),
            None => Err(ZdsError::Invalid("WorkloadResponse without payload".into())),
        }
    }
}

/// The agent's listening socket.
#[derive(Debug)]
pub struct ZdsListener {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsListener {
    /// Listens at `path`, replacing a stale socket file left by an earlier run.
    /// The socket file is owner-only from the start (it hands out network namespaces;
    /// see [`crate::sockfile`]).
    pub fn bind(path: &Path) -> io::Result<ZdsListener> {
        let fd = crate::sockfile::bind_owner_only(path, |at| {
            let fd = seqpacket()?;
            let addr = UnixAddr::new(at).map_err(io::Error::from)?;
            bind(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
            Ok(fd)
        })?;
        listen(&fd, Backlog::new(16).map_err(io::Error::from)?).map_err(io::Error::from)?;
        Ok(ZdsListener { fd: register(fd)? })
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<ZdsSocket> {
        loop {
            let mut guard = self.fd.ready(Interest::READABLE).await?;
            match accept4(
                self.fd.get_ref().as_raw_fd(),
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            ) {
                Ok(raw) => {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    return Ok(ZdsSocket { fd: register(fd)? });
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use trellis_proto::istio::workload::zds::{AddWorkload, workload_request};

    #[tokio::test]
    async fn an_add_carries_the_netns_and_is_acked() {
        let (agent, ztunnel) = ZdsSocket::pair().unwrap();
        ztunnel.send_hello().await.unwrap();
        assert_eq!(agent.recv_hello().await.unwrap().version, 1);
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let req = WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: "pod-1".into(),
                workload_info: None,
            })),
        };
        agent.send_request(&req, Some(netns.as_fd())).await.unwrap();
        let (got, fd) = ztunnel.recv_request().await.unwrap();
        assert_eq!(got, req);
        let fd = fd.expect("netns fd");
        let a = nix::sys::stat::fstat(fd.as_fd()).unwrap();
        let b = nix::sys::stat::fstat(netns.as_fd()).unwrap();
        assert_eq!(
            (a.st_dev, a.st_ino),
            (b.st_dev, b.st_ino),
            "the same namespace"
        );
        ztunnel.send_ack("").await.unwrap();
        assert_eq!(agent.recv_ack().await.unwrap(), Ok(()));
        ztunnel.send_ack("no netns").await.unwrap();
        assert_eq!(agent.recv_ack().await.unwrap(), Err("no netns".into()));
    }

    #[tokio::test]
    async fn garbage_oversize_and_extra_fds_are_errors_not_crashes() {
        let (a, b) = ZdsSocket::pair().unwrap();
        a.send_raw(&[0xff, 0xff, 0xff], None).await.unwrap();
        assert!(matches!(b.recv_request().await, Err(ZdsError::Invalid(_))));
        a.send_raw(&vec![0u8; MAX_MESSAGE + 1], None).await.unwrap();
        let e = b.recv_raw().await.unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        // A request with no payload (only a field this version does not know) is refused.
        a.send_raw(&[0x48, 0x01], None).await.unwrap();
        let e = b.recv_request().await.unwrap_err();
        assert!(e.to_string().contains("without payload"), "{e}");
        // Two descriptors where at most one is expected.
        let f1 = std::fs::File::open("/proc/self/ns/net").unwrap();
        let fds = [f1.as_raw_fd(), f1.as_raw_fd()];
        let iov = [IoSlice::new(&[0x48, 0x01])];
        sendmsg::<()>(
            a.fd.get_ref().as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let e = b.recv_request().await.unwrap_err();
        assert!(e.to_string().contains("2 file descriptors"), "{e}");
        drop(a);
        assert!(matches!(b.recv_raw().await, Err(ZdsError::Closed)));
    }
}
