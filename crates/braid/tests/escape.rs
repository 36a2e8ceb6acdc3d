//! End-to-end confinement: no request, through the mount or hand-made on the wire, reaches an
//! object outside the exported directory.
//!
//! Layout of every fixture: `root/srv/export` is exported, and `root/srv/secret.txt` sits just
//! outside it, where `../secret.txt` from the export root would point.
mod common;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

use braid_proto::{AttrChanges, Command, Handle, WireError};
use common::{wire_errno, Fixture, RawSession};

const SECRET: &[u8] = b"outside the export";

/// Fills the export and plants a file next to it.
fn prepare(export: &Path) {
    fs::write(export.join("inside.txt"), b"inside").unwrap();
    fs::create_dir_all(export.join("a/b")).unwrap();
    symlink("/etc", export.join("etc_link")).unwrap();
    symlink("../../", export.join("up")).unwrap();
    symlink("../secret.txt", export.join("secret_link")).unwrap();
    fs::write(export.parent().unwrap().join("secret.txt"), SECRET).unwrap();
}

#[test]
fn dotdot_paths_through_the_mount_stay_inside_the_export() {
    // Goal: paths with ".." used through the mount create, rename and remove objects only
    // inside the export; symlinks read through the mount resolve on the client.
    // Method: create, mkdir and rename through paths full of "..", then check where each
    // object landed in the export and that nothing appeared next to the export; read through
    // the symlinks to /etc and ../../ (the client's view, which is allowed).
    let fx = Fixture::mounted_with(prepare);
    let outside_before = listing(fx.export.parent().unwrap());
    let root_before = listing(fx.root.path());

    fs::write(fx.m("a/b/../../made-by-dotdot"), b"1").unwrap();
    fs::create_dir(fx.m("a/b/../../a/b/../dir-by-dotdot")).unwrap();
    fs::write(fx.m("a/../a/b/../../a/dir-by-dotdot/../../second"), b"2").unwrap();
    fs::rename(fx.m("a/b/../../second"), fx.m("a/b/../../a/b/../../a/b/renamed")).unwrap();

    assert_eq!(fs::read(fx.e("made-by-dotdot")).unwrap(), b"1");
    assert!(fx.e("a/dir-by-dotdot").is_dir());
    assert_eq!(fs::read(fx.e("a/b/renamed")).unwrap(), b"2");
    assert!(!fx.e("second").exists());

    // Symlinks are followed by the client kernel: /etc here is the client's /etc.
    assert_eq!(fs::read_link(fx.m("etc_link")).unwrap(), Path::new("/etc"));
    assert_eq!(fs::read(fx.m("etc_link/passwd")).unwrap(), fs::read("/etc/passwd").unwrap());
    assert_eq!(fs::read_link(fx.m("up")).unwrap(), Path::new("../../"));
    let client_up = fs::canonicalize(fx.m("up")).unwrap();
    assert_eq!(client_up, fs::canonicalize(fx.mnt.join("../..")).unwrap(), "resolved against the mount point");
    // ../secret.txt from the mount root is the client's <root>/secret.txt, which does not exist:
    // the server's neighbour file is not reachable through the mount.
    assert_eq!(fs::read(fx.m("secret_link")).unwrap_err().raw_os_error(), Some(libc::ENOENT));

    fs::remove_file(fx.m("a/b/../../made-by-dotdot")).unwrap();
    assert!(!fx.e("made-by-dotdot").exists());
    assert_eq!(listing(fx.export.parent().unwrap()), outside_before, "something appeared next to the export");
    assert_eq!(listing(fx.root.path()), root_before, "something appeared in the fixture root");
    assert_eq!(fs::read(fx.export.parent().unwrap().join("secret.txt")).unwrap(), SECRET);
}

#[test]
fn wire_lookup_refuses_names_that_are_not_one_component() {
    // Goal: the server resolves exactly one name component per request and never follows a
    // symlink, whatever a hand-made client sends.
    // Method: with braid-client, look up "..", ".", "a/b", "/etc", "../secret.txt", "" and a
    // name with a NUL byte under the root handle (each must fail with EINVAL); look up
    // through symlink handles (ENOTDIR); then try every mutation with such names.
    let fx = Fixture::serving_with(prepare);
    let mut session = RawSession::open(fx.addr());
    let root = session.root();
    let inside = session.lookup(&root, b"inside.txt").expect("plain lookup works");
    assert_eq!(inside.attr.size, 6);

    let bad_names: [&[u8]; 9] = [b"..", b".", b"a/b", b"/etc", b"../secret.txt", b"", b"x\0y", b"a/..", b"/"];
    for name in bad_names {
        let result = session.lookup(&root, name);
        assert_eq!(result.map(|e| e.attr.ino), Err(errno(libc::EINVAL)), "lookup of {:?}", String::from_utf8_lossy(name));
    }
    let long = vec![b'n'; 256];
    assert_eq!(session.lookup(&root, &long).map(|_| ()), Err(errno(libc::ENAMETOOLONG)));

    // A symlink is an object of its own: never a directory to look into.
    let etc_link = session.lookup(&root, b"etc_link").unwrap();
    assert_eq!(etc_link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(session.readlink(&etc_link.handle).unwrap(), b"/etc");
    assert_eq!(session.lookup(&etc_link.handle, b"passwd").map(|_| ()), Err(errno(libc::ENOTDIR)));
    let up = session.lookup(&root, b"up").unwrap();
    assert_eq!(session.lookup(&up.handle, b"secret.txt").map(|_| ()), Err(errno(libc::ENOTDIR)));
    let secret_link = session.lookup(&root, b"secret_link").unwrap();
    let read = session.read(&secret_link.handle, 0, 4096);
    assert!(read.as_deref() != Ok(SECRET), "reading a symlink handle followed it out of the export");
    let a = session.lookup(&root, b"a").unwrap();

    let mutations: Vec<(&str, Command, i32)> = vec![
        ("create ..", create(&root, b"../escaped-create"), libc::EINVAL),
        ("create /", create(&root, b"/tmp/escaped-create"), libc::EINVAL),
        ("create in a symlink", create(&etc_link.handle, b"escaped-create"), libc::ENOTDIR),
        ("create in ../../", create(&up.handle, b"escaped-create"), libc::ENOTDIR),
        ("create in a file", create(&inside.handle, b"escaped-create"), libc::ENOTDIR),
        ("mkdir ..", Command::Mkdir { parent: root.clone(), name: b"../escaped-dir".to_vec(), mode: 0o755 }, libc::EINVAL),
        ("mkdir a/..", Command::Mkdir { parent: a.handle.clone(), name: b"..".to_vec(), mode: 0o755 }, libc::EINVAL),
        ("symlink ..", Command::Symlink { parent: root.clone(), name: b"../escaped-link".to_vec(), target: b"/".to_vec() }, libc::EINVAL),
        (
            "link to ..",
            Command::Link { handle: inside.handle.clone(), new_parent: root.clone(), new_name: b"../escaped-hardlink".to_vec() },
            libc::EINVAL,
        ),
        (
            "rename to ..",
            Command::Rename {
                parent: root.clone(),
                name: b"inside.txt".to_vec(),
                new_parent: root.clone(),
                new_name: b"../escaped-rename".to_vec(),
                flags: 0,
            },
            libc::EINVAL,
        ),
        (
            "rename from ..",
            Command::Rename {
                parent: root.clone(),
                name: b"../secret.txt".to_vec(),
                new_parent: root.clone(),
                new_name: b"stolen".to_vec(),
                flags: 0,
            },
            libc::EINVAL,
        ),
        (
            "rename through a symlink",
            Command::Rename {
                parent: root.clone(),
                name: b"inside.txt".to_vec(),
                new_parent: up.handle.clone(),
                new_name: b"escaped-rename".to_vec(),
                flags: 0,
            },
            libc::ENOTDIR,
        ),
        ("unlink ..", Command::Unlink { parent: a.handle.clone(), name: b"../inside.txt".to_vec() }, libc::EINVAL),
        ("unlink via symlink", Command::Unlink { parent: up.handle.clone(), name: b"secret.txt".to_vec() }, libc::ENOTDIR),
        ("rmdir ..", Command::Rmdir { parent: a.handle.clone(), name: b"..".to_vec() }, libc::EINVAL),
    ];
    for (what, command, expected) in mutations {
        let result = session.apply(command, &[]);
        assert_eq!(result.map(|_| ()), Err(errno(expected)), "{what}");
    }

    // Changing a symlink's attributes must not reach its target.
    let changes = AttrChanges { mode: Some(0o777), ..Default::default() };
    let result = session.apply(Command::SetAttr { handle: secret_link.handle.clone(), changes }, &[]);
    assert!(result.is_err(), "chmod of a symlink handle succeeded: {result:?}");

    let outside = fx.export.parent().unwrap();
    assert_eq!(listing(outside), ["export", "secret.txt"], "nothing may appear next to the export");
    assert_eq!(fs::read(outside.join("secret.txt")).unwrap(), SECRET);
    assert_eq!(fs::metadata(outside.join("secret.txt")).unwrap().mode() & 0o777, 0o644);
    assert_eq!(fs::read(fx.e("inside.txt")).unwrap(), b"inside");
    assert_no_escaped_files(&fx);
}

#[test]
fn wire_forged_handles_are_refused() {
    // Goal: a client can only name objects through handles the server issued for this export.
    // Method: flip each byte of the root handle from the ExportInfo, truncate it, extend it,
    // send empty and oversized handles: each getattr, lookup and create must fail with ESTALE.
    // Then present a handle issued by a second server (its own key and export) to the first.
    let fx = Fixture::serving_with(prepare);
    let mut session = RawSession::open(fx.addr());
    let root = session.root();
    assert!(session.getattr(&root).is_ok(), "the real root handle works");

    let mut forged = Vec::new();
    for i in 0..root.0.len() {
        for bit in [0x01u8, 0x80] {
            let mut bytes = root.0.clone();
            bytes[i] ^= bit;
            forged.push((format!("byte {i} ^ {bit:#x}"), Handle(bytes)));
        }
    }
    let mut longer = root.0.clone();
    longer.push(0);
    forged.push(("one byte longer".into(), Handle(longer)));
    forged.push(("one byte shorter".into(), Handle(root.0[..root.0.len() - 1].to_vec())));
    forged.push(("empty".into(), Handle(Vec::new())));
    forged.push(("4 KiB".into(), Handle(vec![0x41; 4096])));

    for (what, handle) in &forged {
        assert_eq!(session.getattr(handle).map(|_| ()), Err(errno(libc::ESTALE)), "getattr, {what}");
        assert_eq!(session.lookup(handle, b"inside.txt").map(|_| ()), Err(errno(libc::ESTALE)), "lookup, {what}");
        let result = session.apply(create(handle, b"escaped-forged"), &[]);
        assert_eq!(result.map(|_| ()), Err(errno(libc::ESTALE)), "create, {what}");
    }

    // A second server, with its own key, over a directory outside the first export.
    let other = Fixture::serving_with(|export| fs::write(export.join("foreign.txt"), b"foreign").unwrap());
    let mut other_session = RawSession::open(other.addr());
    let other_root = other_session.root();
    let foreign = other_session.lookup(&other_root, b"foreign.txt").unwrap();
    for (what, handle) in [("foreign root", &other_root), ("foreign file", &foreign.handle)] {
        assert_eq!(session.getattr(handle).map(|_| ()), Err(errno(libc::ESTALE)), "{what}");
        assert_eq!(session.read(handle, 0, 100).map(|_| ()), Err(errno(libc::ESTALE)), "{what}");
    }
    let ours = session.lookup(&root, b"inside.txt").unwrap();
    assert_eq!(other_session.read(&ours.handle, 0, 100).map(|_| ()), Err(errno(libc::ESTALE)));

    assert!(session.getattr(&root).is_ok(), "the session still works");
    assert_no_escaped_files(&fx);
    assert!(!other.e("escaped-forged").exists());
}

// ---- helpers ----------------------------------------------------------------------------

fn errno(code: i32) -> WireError {
    wire_errno(code)
}

fn create(parent: &Handle, name: &[u8]) -> Command {
    Command::Create { parent: parent.clone(), name: name.to_vec(), mode: libc::S_IFREG | 0o644, rdev: 0, exclusive: true, pin: false }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

/// No "escaped*" name exists anywhere a confused server could have put one.
fn assert_no_escaped_files(fx: &Fixture) {
    let places: Vec<PathBuf> = vec![
        fx.export.clone(),
        fx.export.parent().unwrap().to_path_buf(),
        fx.root.path().to_path_buf(),
        "/".into(),
        "/tmp".into(),
        "/etc".into(),
    ];
    for place in places {
        for name in listing(&place) {
            assert!(!name.starts_with("escaped") && name != "stolen", "{}/{name} was created", place.display());
        }
    }
}
