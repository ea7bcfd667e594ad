//! The gRPC framing the waypoint's own unary calls use (the external authorizer's `Check`,
//! the OTLP `Export`): a length-prefixed request message, and the reply's status from the
//! trailers (or the headers of a trailers-only reply) and its message.

use bytes::Bytes;
use http_body_util::BodyExt;

/// `msg` as one uncompressed, length-prefixed gRPC message.
pub fn frame(msg: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(5 + msg.len());
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(msg);
    Bytes::from(framed)
}

/// The message of a unary reply (empty when it has none), read up to 1 MiB; an error
/// names the `grpc-status` when it is not 0 (OK), or what else went wrong.
pub async fn unary_reply(resp: http::Response<hyper::body::Incoming>) -> Result<Bytes, String> {
    let head = resp.headers().get("grpc-status").cloned();
    let collected = http_body_util::Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| format!("response: {e}"))?;
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(head);
    match status.as_ref().map(http::HeaderValue::as_bytes) {
        Some(b"0") => {}
        Some(s) => return Err(format!("grpc-status {}", String::from_utf8_lossy(s))),
        None => return Err("no grpc-status".into()),
    }
    let bytes = collected.to_bytes();
    Ok(if bytes.len() >= 5 {
        bytes.slice(5..)
    } else {
        Bytes::new()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_frame_is_the_flag_the_length_and_the_message() {
        assert_eq!(&super::frame(b"abc")[..], b"\0\0\0\0\x03abc");
    }
}
