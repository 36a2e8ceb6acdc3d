//! The one mapping from client errors to the errno an application sees.
use braid_client::ClientError;
use fuser::Errno;

pub fn errno_for(error: &ClientError) -> Errno {
    match error {
        ClientError::Errno(e) => Errno::from_i32(e.0),
        ClientError::ReadOnly => Errno::EROFS,
        ClientError::TimedOut { .. } => {
            tracing::error!(%error, "giving up on a request");
            Errno::ETIMEDOUT
        }
        ClientError::Refused { .. } | ClientError::Unreachable { .. } | ClientError::Protocol(_) => {
            tracing::error!(%error, "request failed");
            Errno::EIO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_proto::Errno as WireErrno;

    #[test]
    fn every_client_error_has_an_errno() {
        let rows = [
            (ClientError::Errno(WireErrno(libc::ENOENT)), libc::ENOENT),
            (ClientError::Errno(WireErrno(libc::EXDEV)), libc::EXDEV),
            (ClientError::ReadOnly, libc::EROFS),
            (ClientError::TimedOut { server: "s".into(), budget_ms: 1 }, libc::ETIMEDOUT),
            (ClientError::Refused { server: "s".into(), reason: "r".into() }, libc::EIO),
            (ClientError::Unreachable { server: "s".into(), reason: "r".into() }, libc::EIO),
            (ClientError::Protocol("p".into()), libc::EIO),
        ];
        for (error, expected) in rows {
            assert_eq!(errno_for(&error).code(), expected, "{error}");
        }
    }
}
