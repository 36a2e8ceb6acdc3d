//! Faults of the exported file system: a full disk gives the application ENOSPC, loses nothing
//! already written, and the mount keeps working once space is freed.
mod common;

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use common::Fixture;

/// A small tmpfs mounted on the export directory, unmounted on drop (after the fixture, which
/// must therefore be declared after it).
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_export_gives_enospc_and_loses_nothing() {
    // Goal: a full disk is an error the application sees as ENOSPC, not EIO or a hang, and
    // what was written before stays intact. Method: export an 8 MiB tmpfs, write a small file,
    // then fill the file system through the mount until a write fails; check the errno, the
    // small file, and that freeing space makes writes work again.
    let mut small_fs = None;
    let mut fixture = Fixture::serving_with(|export| {
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=8m", "braid-test", export.to_str().expect("utf-8")]).status();
        assert!(status.is_ok_and(|s| s.success()), "cannot mount a tmpfs on the export (run as root)");
        small_fs = Some(SmallFs(export.to_path_buf()));
    });
    fixture.mount();
    let keep = fixture.m("keep.txt");
    fs::write(&keep, b"written before the disk filled").expect("write the small file");

    let mut big = fs::File::create(fixture.m("big")).expect("create big");
    let chunk = vec![0x5a; 256 * 1024];
    let error = (0..64).find_map(|_| big.write_all(&chunk).err()).expect("8 MiB of tmpfs filled without an error");
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "a full disk must read as ENOSPC: {error}");
    drop(big);

    assert_eq!(fs::read(&keep).expect("read the small file"), b"written before the disk filled");
    fs::remove_file(fixture.m("big")).expect("remove big");
    fs::write(fixture.m("after"), &chunk).expect("write after freeing space");
    assert_eq!(fs::read(fixture.e("after")).expect("read in the export"), chunk);
    fixture.assert_mount_works("after ENOSPC");
    drop(fixture);
    drop(small_fs);
}
