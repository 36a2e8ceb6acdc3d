//! Security and export policy: TLS with client certificates, negotiation, read-only exports,
//! size limits, root squash, and frame checksums on a corrupting network.
mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{braid_exe, Fixture};

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(braid_exe()).args(args).output().expect("run braid");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn init_credentials(dir: &Path) {
    let (ok, text) = run(&["init", "--dir", dir.to_str().expect("utf-8"), "--server-name", "127.0.0.1"]);
    assert!(ok, "braid init failed: {text}");
}

/// Tries to mount `fixture`'s server with `extra` arguments; returns the error text.
fn failed_mount(fixture: &Fixture, extra: &[&str]) -> String {
    let addr = fixture.addr().to_string();
    let mut args = vec!["mount", addr.as_str(), fixture.mnt.to_str().expect("utf-8"), "--foreground", "--timeout", "5"];
    args.extend_from_slice(extra);
    let (ok, text) = run(&args);
    assert!(!ok, "mount with {extra:?} succeeded: {text}");
    text
}

#[test]
fn tls_mount_works_and_strangers_are_refused() {
    // Goal: with credentials from `braid init` the mount works over TLS; a plain client, a
    // client of another authority, and a TLS client of a plain server are each refused with a
    // message that says why. Method: real server and mounts, one per case.
    let creds = tempfile::tempdir().expect("temp dir");
    let other = tempfile::tempdir().expect("temp dir");
    init_credentials(creds.path());
    init_credentials(other.path());
    let dir = creds.path().to_str().expect("utf-8").to_string();
    let mut fixture = Fixture::serving_with_args(
        |_| {},
        vec!["--tls-dir".into(), dir.clone(), "--no-root-squash".into()],
        // aead: under TLS the frames carry no payload checksum of their own (the AEAD covers them).
        ["--tls-dir", &dir, "--require", "tls13", "--require", "x509", "--require", "aead"].map(String::from).to_vec(),
    );
    fixture.mount();
    fixture.assert_mount_works("over TLS");

    let plain = failed_mount(&fixture, &["--insecure"]);
    assert!(plain.contains("accepts only TLS"), "plain client: {plain}");
    let stranger = failed_mount(&fixture, &["--tls-dir", other.path().to_str().expect("utf-8")]);
    assert!(stranger.contains("TLS") && stranger.contains("certificate"), "client of another authority: {stranger}");
    let no_creds = failed_mount(&fixture, &["--tls-dir", "/nonexistent/braid-creds"]);
    assert!(no_creds.contains("no TLS credentials"), "client without credentials: {no_creds}");
    fixture.assert_mount_works("after the refusals");

    let plain_server = Fixture::serving_with(|_| {});
    let tls_to_plain = failed_mount(&plain_server, &["--tls-dir", &dir]);
    assert!(tls_to_plain.contains("TLS handshake"), "TLS client of a plain server: {tls_to_plain}");
}

#[test]
fn a_required_algorithm_the_server_lacks_is_named() {
    // Goal: `--require` makes the mount fail, naming the algorithm, instead of running without it.
    let fixture = Fixture::serving_with(|_| {});
    // aead is refused too: without encryption nothing else would check the payload.
    for (algorithm, needle) in [("tls13", "tls13"), ("blake3", "blake3"), ("x509", "x509"), ("aead", "aead")] {
        let text = failed_mount(&fixture, &["--insecure", "--require", algorithm]);
        assert!(text.contains(needle), "--require {algorithm}: {text}");
    }
}

#[test]
fn read_only_export_refuses_every_change() {
    // Goal: on a --read-only export every change fails with EROFS and nothing changes on disk.
    let mut args = common::plain_server_args();
    args.push("--read-only".into());
    let mut fixture = Fixture::serving_with_args(|e| fs::write(e.join("f"), b"original").expect("seed"), args, common::plain_mount_args());
    fixture.mount();
    assert_eq!(fs::read(fixture.m("f")).expect("reads still work"), b"original");
    let attempts: Vec<(&str, std::io::Result<()>)> = vec![
        ("create", fs::write(fixture.m("new"), b"x")),
        ("overwrite", fs::OpenOptions::new().write(true).open(fixture.m("f")).map(|_| ())),
        ("mkdir", fs::create_dir(fixture.m("d"))),
        ("unlink", fs::remove_file(fixture.m("f"))),
        ("rename", fs::rename(fixture.m("f"), fixture.m("g"))),
    ];
    for (what, result) in attempts {
        let error = result.expect_err(what);
        assert_eq!(error.raw_os_error(), Some(libc::EROFS), "{what}: {error}");
    }
    let names: Vec<_> = fs::read_dir(&fixture.export).expect("list export").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    assert_eq!(fs::read(fixture.e("f")).expect("read export"), b"original");
}

#[test]
fn size_limit_shows_in_statfs_and_stops_growth_with_enospc() {
    // Goal: --max-size is the size df shows, and writes past it fail with ENOSPC; space freed
    // by unlink is usable again. Method: 4 MiB limit, write until refused.
    let mut args = common::plain_server_args();
    args.extend(["--max-size".into(), "4M".into()]);
    let mut fixture = Fixture::serving_with_args(|_| {}, args, common::plain_mount_args());
    fixture.mount();
    let stat = common::statvfs(&fixture.mnt);
    assert_eq!(stat.f_blocks * stat.f_frsize, 4 << 20, "statfs size (blocks x fragment size)");

    let chunk = vec![1u8; 512 * 1024];
    let mut file = fs::File::create(fixture.m("big")).expect("create");
    let written = (0..16).take_while(|_| file.write_all(&chunk).is_ok()).count();
    assert!((6..=8).contains(&written), "{written} chunks of 512 KiB fit in 4 MiB");
    let error = file.write_all(&chunk).expect_err("past the limit");
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
    drop(file);
    fs::remove_file(fixture.m("big")).expect("unlink");
    fs::write(fixture.m("again"), &chunk).expect("space freed by unlink is usable");
}

#[test]
fn remote_root_is_squashed_by_default() {
    // Goal: without --no-root-squash, root on the client changes the export as nobody: its new
    // files belong to nobody and root-owned files are out of its reach.
    let mut fixture = Fixture::serving_with_args(
        |e| {
            fs::create_dir(e.join("shared")).expect("mkdir");
            fs::set_permissions(e.join("shared"), std::os::unix::fs::PermissionsExt::from_mode(0o1777)).expect("chmod");
            fs::write(e.join("roots"), b"root's").expect("seed");
        },
        vec!["--insecure".into()],
        common::plain_mount_args(),
    );
    fixture.mount();
    let denied = fs::write(fixture.m("not-mine"), b"x").expect_err("nobody cannot create in root's directory");
    assert_eq!(denied.raw_os_error(), Some(libc::EACCES), "{denied}");
    fs::write(fixture.m("shared/mine"), b"x").expect("create in a world-writable directory");
    assert_eq!(fs::metadata(fixture.e("shared/mine")).expect("stat").uid(), 65534, "created as nobody");
    let error = fs::write(fixture.m("roots"), b"changed").expect_err("root's file is not writable by nobody");
    assert_eq!(error.raw_os_error(), Some(libc::EACCES), "{error}");
    assert_eq!(fs::read(fixture.e("roots")).expect("read"), b"root's");
}

#[test]
fn a_corrupted_frame_is_detected_and_the_request_resent() {
    // Goal: a bit flipped on the wire never reaches the disk: the server's checksum check
    // refuses the frame, the client resends it, and the file holds exactly what was written.
    // Method: mount through a proxy that flips one bit in the first large client->server chunk.
    let mut fixture = Fixture::serving_with(|_| {});
    let proxy = FlippingProxy::start(fixture.addr());
    fixture.mount_via = Some(proxy.addr);
    fixture.mount();
    let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write(fixture.m("data"), &content).expect("write through the corrupting link");
    assert!(proxy.flipped.load(Ordering::Acquire), "the proxy corrupted nothing: the test proves nothing");
    assert_eq!(fs::read(fixture.e("data")).expect("read export"), content, "the export holds the data as written");
    assert!(fixture.logs_tail().contains("checksum"), "the server logged the bad checksum:\n{}", fixture.logs_tail());
}

/// A TCP proxy that flips one bit of the first client->server read of at least 64 KiB.
struct FlippingProxy {
    addr: SocketAddr,
    flipped: Arc<AtomicBool>,
}

impl FlippingProxy {
    fn start(server: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let flipped = Arc::new(AtomicBool::new(false));
        let flag = flipped.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(server) else { continue };
                let (c2, u2) = (client.try_clone().expect("clone"), upstream.try_clone().expect("clone"));
                let flag = flag.clone();
                std::thread::spawn(move || pump(client, upstream, Some(flag)));
                std::thread::spawn(move || pump(u2, c2, None));
            }
        });
        Self { addr, flipped }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, flip: Option<Arc<AtomicBool>>) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(flag) = &flip {
            if n >= 64 * 1024 && !flag.swap(true, Ordering::AcqRel) {
                buf[n / 2] ^= 0x10;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

#[test]
fn garbage_after_a_tls_hello_closes_only_that_connection() {
    // Goal: a connection that starts like TLS and then sends junk fails its handshake alone.
    let creds = tempfile::tempdir().expect("temp dir");
    init_credentials(creds.path());
    let dir = creds.path().to_str().expect("utf-8").to_string();
    let mut fixture =
        Fixture::serving_with_args(|_| {}, vec!["--tls-dir".into(), dir.clone(), "--no-root-squash".into()], vec!["--tls-dir".into(), dir]);
    fixture.mount();
    for junk in [&b"\x16\x03\x01\x02\x00garbage garbage garbage"[..], &[0x16; 4096][..], &b"\x16\x03\x03\x00\x05\x01\x00\x00\x01\x00"[..]] {
        let mut stream = TcpStream::connect(fixture.addr()).expect("connect");
        let _ = stream.write_all(junk);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        common::assert_closed_by_peer(&mut stream, "TLS junk", std::time::Duration::from_secs(15));
        fixture.assert_mount_works("after TLS junk");
    }
}
