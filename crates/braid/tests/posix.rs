//! End-to-end POSIX behaviour: a real `braid serve` and a real FUSE mount. Each test checks the
//! outcome both through the mount (the client's view) and in the export directory (what the
//! server actually did to the exported file system).
mod common;

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{cstr, getxattr, last_errno, setxattr, write_as_user, Fixture, Rng};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

#[test]
fn files_already_in_the_export_appear_in_the_mount() {
    // Goal: a directory exported with content shows that content, unchanged, in the mount.
    // Method: fill the export before the server starts (files, a nested directory, a symlink,
    // a 3 MiB file); then compare listing, contents, sizes and modes through the mount.
    let big = Rng::new(11).bytes(3 * MIB as usize + 17);
    let big_in_export = big.clone();
    let fx = Fixture::mounted_with(move |export| {
        fs::write(export.join("hello.txt"), b"hello, world\n").unwrap();
        fs::create_dir_all(export.join("a/b")).unwrap();
        fs::write(export.join("a/b/deep.txt"), b"deep").unwrap();
        fs::write(export.join("big.bin"), &big_in_export).unwrap();
        fs::set_permissions(export.join("hello.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        symlink("hello.txt", export.join("link")).unwrap();
    });

    let mut names: Vec<String> = fs::read_dir(&fx.mnt).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["a", "big.bin", "hello.txt", "link"]);
    assert_eq!(fs::read(fx.m("hello.txt")).unwrap(), b"hello, world\n");
    assert_eq!(fs::read(fx.m("a/b/deep.txt")).unwrap(), b"deep");
    assert_eq!(fs::read(fx.m("big.bin")).unwrap(), big);
    assert_eq!(fs::read(fx.m("link")).unwrap(), b"hello, world\n", "a relative symlink resolves inside the mount");
    let through_mount = fs::metadata(fx.m("hello.txt")).unwrap();
    let in_export = fs::metadata(fx.e("hello.txt")).unwrap();
    assert_eq!(through_mount.mode(), in_export.mode());
    assert_eq!(through_mount.mode() & 0o7777, 0o640);
    assert_eq!(through_mount.ino(), in_export.ino(), "the mount shows the server's inode numbers");
    assert_eq!(through_mount.len(), 13);
    assert!(fs::metadata(fx.m("a/b")).unwrap().is_dir());
}

#[test]
fn create_write_and_read_back() {
    // Goal: data written through the mount reads back the same, through the mount and in the
    // export. Method: write 2.5 MiB of random bytes in uneven chunks at increasing offsets,
    // overwrite a range in the middle, append, then compare whole files both ways.
    let fx = Fixture::mounted();
    let mut rng = Rng::new(7);
    let mut expected = rng.bytes((2 * MIB + MIB / 2) as usize);
    {
        let file = OpenOptions::new().create_new(true).read(true).write(true).open(fx.m("data.bin")).unwrap();
        let mut at = 0usize;
        let mut chunk = 1usize;
        while at < expected.len() {
            let end = (at + chunk).min(expected.len());
            file.write_all_at(&expected[at..end], at as u64).unwrap();
            at = end;
            chunk = chunk * 3 + 1;
        }
        let patch = rng.bytes(70_000);
        file.write_all_at(&patch, 1_000_000).unwrap();
        expected[1_000_000..1_070_000].copy_from_slice(&patch);
        let mut read = vec![0u8; 70_000];
        file.read_exact_at(&mut read, 1_000_000).unwrap();
        assert_eq!(read, patch, "read back through the same descriptor");
    }
    let tail = b"appended tail";
    let mut appender = OpenOptions::new().append(true).open(fx.m("data.bin")).unwrap();
    std::io::Write::write_all(&mut appender, tail).unwrap();
    drop(appender);
    expected.extend_from_slice(tail);

    assert_eq!(fs::metadata(fx.m("data.bin")).unwrap().len(), expected.len() as u64);
    assert!(fs::read(fx.m("data.bin")).unwrap() == expected, "content through the mount differs");
    assert!(fs::read(fx.e("data.bin")).unwrap() == expected, "content in the export differs");

    let error = OpenOptions::new().create_new(true).write(true).open(fx.m("data.bin")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EEXIST), "O_EXCL on an existing file");
    let error = File::open(fx.m("missing")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOENT));
}

#[test]
fn namespace_changes_reach_the_export() {
    // Goal: every change made through the mount is made on the server's directory.
    // Method: mkdir, create, rename across directories, truncate, unlink, rmdir through the
    // mount; after each step, look at the export directory directly.
    let fx = Fixture::mounted();
    fs::create_dir(fx.m("d1")).unwrap();
    fs::create_dir_all(fx.m("d2/sub")).unwrap();
    assert!(fx.e("d2/sub").is_dir());
    fs::write(fx.m("d1/f"), b"0123456789").unwrap();
    assert_eq!(fs::read(fx.e("d1/f")).unwrap(), b"0123456789");

    fs::rename(fx.m("d1/f"), fx.m("d2/sub/g")).unwrap();
    assert!(!fx.e("d1/f").exists());
    assert_eq!(fs::read(fx.e("d2/sub/g")).unwrap(), b"0123456789");
    assert_eq!(fs::read(fx.m("d2/sub/g")).unwrap(), b"0123456789");

    OpenOptions::new().write(true).open(fx.m("d2/sub/g")).unwrap().set_len(4).unwrap();
    assert_eq!(fs::read(fx.e("d2/sub/g")).unwrap(), b"0123");
    assert_eq!(fs::metadata(fx.m("d2/sub/g")).unwrap().len(), 4);

    let error = fs::remove_dir(fx.m("d2/sub")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::remove_file(fx.m("d2/sub/g")).unwrap();
    assert!(!fx.e("d2/sub/g").exists());
    fs::remove_dir(fx.m("d2/sub")).unwrap();
    assert!(!fx.e("d2/sub").exists());
    fs::rename(fx.m("d2"), fx.m("d1/d2")).unwrap();
    assert!(fx.e("d1/d2").is_dir());
    assert!(!fx.e("d2").exists());
}

#[test]
fn rename_noreplace_and_exchange() {
    // Goal: renameat2 flags keep their meaning across the network.
    // Method: RENAME_NOREPLACE onto an existing name must fail with EEXIST and change nothing,
    // and onto a free name must move; RENAME_EXCHANGE must swap two files' contents.
    let fx = Fixture::mounted();
    fs::write(fx.m("a"), b"content of a").unwrap();
    fs::write(fx.m("b"), b"content of b").unwrap();

    let result = renameat2(&fx.m("a"), &fx.m("b"), libc::RENAME_NOREPLACE);
    assert_eq!(result, Err(libc::EEXIST), "RENAME_NOREPLACE onto an existing file");
    assert_eq!(fs::read(fx.e("a")).unwrap(), b"content of a");
    assert_eq!(fs::read(fx.e("b")).unwrap(), b"content of b");
    assert_eq!(fs::read(fx.m("b")).unwrap(), b"content of b");

    renameat2(&fx.m("a"), &fx.m("c"), libc::RENAME_NOREPLACE).expect("RENAME_NOREPLACE onto a free name");
    assert!(!fx.e("a").exists());
    assert_eq!(fs::read(fx.e("c")).unwrap(), b"content of a");

    let ino_b = fs::metadata(fx.m("b")).unwrap().ino();
    let ino_c = fs::metadata(fx.m("c")).unwrap().ino();
    renameat2(&fx.m("b"), &fx.m("c"), libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE");
    assert_eq!(fs::read(fx.m("b")).unwrap(), b"content of a");
    assert_eq!(fs::read(fx.m("c")).unwrap(), b"content of b");
    assert_eq!(fs::read(fx.e("b")).unwrap(), b"content of a");
    assert_eq!(fs::read(fx.e("c")).unwrap(), b"content of b");
    assert_eq!(fs::metadata(fx.m("b")).unwrap().ino(), ino_c, "the inodes moved, not the data");
    assert_eq!(fs::metadata(fx.m("c")).unwrap().ino(), ino_b);

    let result = renameat2(&fx.m("b"), &fx.m("missing"), libc::RENAME_EXCHANGE);
    assert_eq!(result, Err(libc::ENOENT), "RENAME_EXCHANGE needs both names");
}

#[test]
fn hard_link_shares_the_inode() {
    // Goal: a hard link made through the mount is one inode with two names.
    // Method: link, then compare st_ino and st_nlink through the mount and in the export, and
    // write through one name and read through the other.
    let fx = Fixture::mounted();
    fs::write(fx.m("first"), b"shared").unwrap();
    fs::create_dir(fx.m("dir")).unwrap();
    fs::hard_link(fx.m("first"), fx.m("dir/second")).unwrap();

    let one = fs::metadata(fx.m("first")).unwrap();
    let two = fs::metadata(fx.m("dir/second")).unwrap();
    assert_eq!(one.ino(), two.ino());
    assert_eq!(one.nlink(), 2);
    assert_eq!(two.nlink(), 2);
    let server_one = fs::metadata(fx.e("first")).unwrap();
    let server_two = fs::metadata(fx.e("dir/second")).unwrap();
    assert_eq!(server_one.ino(), server_two.ino(), "a real hard link in the export");
    assert_eq!(server_one.nlink(), 2);

    OpenOptions::new().write(true).open(fx.m("dir/second")).unwrap().write_all_at(b"SH", 0).unwrap();
    assert_eq!(fs::read(fx.m("first")).unwrap(), b"SHared");
    fs::remove_file(fx.m("first")).unwrap();
    assert_eq!(fs::metadata(fx.m("dir/second")).unwrap().nlink(), 1);
    assert_eq!(fs::metadata(fx.e("dir/second")).unwrap().nlink(), 1);

    let error = fs::hard_link(fx.m("dir/second"), fx.m("dir/second")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EEXIST));
}

#[test]
fn symlink_and_readlink() {
    // Goal: symlinks keep their exact target text, and are followed on the client.
    // Method: create symlinks with relative, dotted and absolute targets; readlink through the
    // mount and in the export; open a file through a relative link.
    let fx = Fixture::mounted();
    fs::write(fx.m("target.txt"), b"pointed at").unwrap();
    let targets = ["target.txt", "some/../odd/./path", "/nonexistent/absolute", "dangling"];
    for (i, target) in targets.iter().enumerate() {
        let name = format!("link{i}");
        symlink(target, fx.m(&name)).unwrap();
        assert_eq!(fs::read_link(fx.m(&name)).unwrap(), Path::new(target));
        assert_eq!(fs::read_link(fx.e(&name)).unwrap(), Path::new(target), "the export holds the same symlink");
        assert!(fs::symlink_metadata(fx.m(&name)).unwrap().file_type().is_symlink());
    }
    assert_eq!(fs::read(fx.m("link0")).unwrap(), b"pointed at");
    assert_eq!(fs::read(fx.m("link3")).unwrap_err().raw_os_error(), Some(libc::ENOENT), "a dangling link");
    let long_target = "x/".repeat(2000);
    symlink(&long_target, fx.m("long")).unwrap();
    assert_eq!(fs::read_link(fx.m("long")).unwrap(), Path::new(&long_target));
}

#[test]
fn mknod_fifo_socket_and_char_device() {
    // Goal: special files can be created through the mount and are real nodes on the server.
    // Method: mknod a fifo, a socket node and (as root) the character device 1:3; check the
    // type and rdev through the mount and in the export; pass bytes through the fifo.
    let fx = Fixture::mounted();
    mknod(&fx.m("fifo"), libc::S_IFIFO | 0o644, 0).expect("mknod fifo");
    mknod(&fx.m("sock"), libc::S_IFSOCK | 0o755, 0).expect("mknod socket");
    assert!(fs::metadata(fx.m("fifo")).unwrap().file_type().is_fifo());
    assert!(fs::metadata(fx.e("fifo")).unwrap().file_type().is_fifo());
    assert!(fs::metadata(fx.m("sock")).unwrap().file_type().is_socket());
    assert!(fs::metadata(fx.e("sock")).unwrap().file_type().is_socket());
    assert_eq!(fs::metadata(fx.m("fifo")).unwrap().mode() & 0o7777, 0o644 & !current_umask());

    // A fifo on a FUSE mount is a local pipe of the client kernel: open both ends and pass data.
    // The read end is opened non-blocking first, so that no open waits for the other end.
    let mut reader = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(fx.m("fifo")).unwrap();
    let mut writer = OpenOptions::new().write(true).open(fx.m("fifo")).unwrap();
    std::io::Write::write_all(&mut writer, b"through the fifo").unwrap();
    drop(writer);
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut got).unwrap();
    assert_eq!(got, b"through the fifo");

    let device = libc::makedev(1, 3);
    if unsafe { libc::geteuid() } == 0 {
        mknod(&fx.m("null"), libc::S_IFCHR | 0o600, device).expect("mknod char device as root");
        let through_mount = fs::metadata(fx.m("null")).unwrap();
        let in_export = fs::metadata(fx.e("null")).unwrap();
        assert!(through_mount.file_type().is_char_device());
        assert!(in_export.file_type().is_char_device());
        assert_eq!(through_mount.rdev(), device);
        assert_eq!(in_export.rdev(), device);
    } else {
        assert_eq!(mknod(&fx.m("null"), libc::S_IFCHR | 0o600, device), Err(libc::EPERM));
    }
    assert_eq!(mknod(&fx.m("fifo"), libc::S_IFIFO | 0o644, 0), Err(libc::EEXIST));
}

#[test]
fn xattr_set_get_list_remove() {
    // Goal: user extended attributes round-trip and report the POSIX errors.
    // Method: set two attributes; get them (exact value, size query, ERANGE for a short
    // buffer, ENODATA for a missing one); list them; check the export has them; remove one;
    // check XATTR_CREATE / XATTR_REPLACE.
    let fx = Fixture::mounted();
    fs::write(fx.m("f"), b"x").unwrap();
    let file = fx.m("f");
    setxattr(&file, "user.braid.one", b"first value", 0).unwrap();
    setxattr(&file, "user.braid.two", &[0u8, 1, 2, 255], 0).unwrap();

    assert_eq!(getxattr(&file, "user.braid.one", 64), Ok(b"first value".to_vec()));
    assert_eq!(getxattr(&file, "user.braid.two", 64), Ok(vec![0u8, 1, 2, 255]));
    assert_eq!(getxattr_size(&file, "user.braid.one"), Ok(11), "size query with an empty buffer");
    assert_eq!(getxattr(&file, "user.braid.one", 4), Err(libc::ERANGE));
    assert_eq!(getxattr(&file, "user.braid.missing", 64), Err(libc::ENODATA));
    assert_eq!(getxattr(&fx.e("f"), "user.braid.one", 64), Ok(b"first value".to_vec()), "set on the server's file");

    let names = listxattr(&file, 4096).unwrap();
    assert!(names.contains(&"user.braid.one".to_string()), "{names:?}");
    assert!(names.contains(&"user.braid.two".to_string()), "{names:?}");
    assert_eq!(listxattr(&file, 5), Err(libc::ERANGE));

    assert_eq!(setxattr(&file, "user.braid.one", b"again", libc::XATTR_CREATE), Err(libc::EEXIST));
    assert_eq!(setxattr(&file, "user.braid.new", b"v", libc::XATTR_REPLACE), Err(libc::ENODATA));
    setxattr(&file, "user.braid.one", b"replaced", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&file, "user.braid.one", 64), Ok(b"replaced".to_vec()));

    removexattr(&file, "user.braid.one").unwrap();
    assert_eq!(getxattr(&file, "user.braid.one", 64), Err(libc::ENODATA));
    assert_eq!(getxattr(&fx.e("f"), "user.braid.one", 64), Err(libc::ENODATA), "removed on the server");
    assert_eq!(removexattr(&file, "user.braid.one"), Err(libc::ENODATA));
    let names = listxattr(&file, 4096).unwrap();
    assert!(!names.contains(&"user.braid.one".to_string()), "{names:?}");
    assert!(names.contains(&"user.braid.two".to_string()), "{names:?}");
}

#[test]
fn utimensat_omit_and_now() {
    // Goal: UTIME_OMIT leaves a time alone and UTIME_NOW sets it to the current time.
    // Method: set both times to fixed values with nanoseconds; then set (OMIT, NOW) and
    // (NOW, OMIT); after each, compare through the mount and in the export.
    let fx = Fixture::mounted();
    fs::write(fx.m("t"), b"t").unwrap();
    let path = fx.m("t");
    let fixed_atime = (1_000_000_000, 123_456_789);
    let fixed_mtime = (1_100_000_000, 987_654_321);
    utimensat(&path, ts(fixed_atime), ts(fixed_mtime)).unwrap();
    for p in [fx.m("t"), fx.e("t")] {
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.atime(), m.atime_nsec()), fixed_atime, "{}", p.display());
        assert_eq!((m.mtime(), m.mtime_nsec()), fixed_mtime, "{}", p.display());
    }

    let before = now_secs();
    utimensat(&path, omit(), now()).unwrap();
    let after = now_secs();
    for p in [fx.m("t"), fx.e("t")] {
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.atime(), m.atime_nsec()), fixed_atime, "omitted atime changed: {}", p.display());
        assert!(m.mtime() >= before - 1 && m.mtime() <= after + 1, "mtime {} not now ({before}..{after})", m.mtime());
    }
    let mtime_now = {
        let m = fs::metadata(fx.e("t")).unwrap();
        (m.mtime(), m.mtime_nsec())
    };

    utimensat(&path, now(), omit()).unwrap();
    for p in [fx.m("t"), fx.e("t")] {
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), mtime_now, "omitted mtime changed: {}", p.display());
        assert!(m.atime() >= before - 1, "atime {} not now", m.atime());
    }
}

#[test]
fn fallocate_grows_and_keep_size_does_not() {
    // Goal: fallocate allocates on the server; plain mode grows the size, KEEP_SIZE does not.
    // Method: fallocate 1 MiB at 0, then 2 MiB past the end with FALLOC_FL_KEEP_SIZE; compare
    // st_size and the blocks allocated in the export.
    let fx = Fixture::mounted();
    let file = OpenOptions::new().create_new(true).read(true).write(true).open(fx.m("alloc")).unwrap();
    check(unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, MIB as i64) }).expect("fallocate");
    assert_eq!(file.metadata().unwrap().len(), MIB);
    assert_eq!(fs::metadata(fx.e("alloc")).unwrap().len(), MIB);
    assert!(fs::metadata(fx.e("alloc")).unwrap().blocks() * 512 >= MIB, "space allocated in the export");

    check(unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, MIB as i64, 2 * MIB as i64) })
        .expect("fallocate KEEP_SIZE");
    assert_eq!(fs::metadata(fx.m("alloc")).unwrap().len(), MIB, "KEEP_SIZE changed the size");
    let in_export = fs::metadata(fx.e("alloc")).unwrap();
    assert_eq!(in_export.len(), MIB);
    assert!(in_export.blocks() * 512 >= 3 * MIB, "KEEP_SIZE did not allocate: {} blocks", in_export.blocks());

    let mut zeros = vec![1u8; 4096];
    file.read_exact_at(&mut zeros, MIB - 4096).unwrap();
    assert!(zeros.iter().all(|&b| b == 0), "allocated space reads as zeros");

    // Punching a hole frees the range and keeps the size; the hole reads as zeros.
    file.write_all_at(&vec![0x77u8; MIB as usize], 0).unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    check(unsafe { libc::fallocate(file.as_raw_fd(), punch, 256 * KIB as i64, 256 * KIB as i64) }).expect("punch hole");
    assert_eq!(fs::metadata(fx.m("alloc")).unwrap().len(), MIB);
    assert_eq!(seek(file.as_raw_fd(), 0, libc::SEEK_HOLE), Ok(256 * KIB), "the punched hole is found");
    let content = fs::read(fx.e("alloc")).unwrap();
    assert!(content[..256 * KIB as usize].iter().all(|&b| b == 0x77));
    assert!(content[256 * KIB as usize..512 * KIB as usize].iter().all(|&b| b == 0), "the punched range reads as zeros");
    assert!(content[512 * KIB as usize..].iter().all(|&b| b == 0x77));
}

#[test]
fn seek_data_and_seek_hole_on_a_sparse_file() {
    // Goal: SEEK_DATA and SEEK_HOLE report the server file's layout.
    // Method: write 64 KiB at 0 and 64 KiB at 4 MiB, leaving a hole between; check the offsets
    // lseek returns through the mount against the layout (and against lseek in the export).
    let fx = Fixture::mounted();
    let file = OpenOptions::new().create_new(true).read(true).write(true).open(fx.m("sparse")).unwrap();
    let chunk = vec![0xa5u8; 64 * KIB as usize];
    file.write_all_at(&chunk, 0).unwrap();
    file.write_all_at(&chunk, 4 * MIB).unwrap();
    let size = 4 * MIB + 64 * KIB;
    assert_eq!(file.metadata().unwrap().len(), size);

    let fd = file.as_raw_fd();
    let hole = seek(fd, 0, libc::SEEK_HOLE).unwrap();
    assert!((64 * KIB..4 * MIB).contains(&hole), "first hole at {hole}");
    assert_eq!(seek(fd, 64 * KIB + 10, libc::SEEK_DATA), Ok(4 * MIB), "data after the hole");
    assert_eq!(seek(fd, 100, libc::SEEK_DATA), Ok(100), "inside data");
    assert_eq!(seek(fd, 4 * MIB, libc::SEEK_HOLE), Ok(size), "the end of file is a hole");
    assert_eq!(seek(fd, size, libc::SEEK_DATA), Err(libc::ENXIO), "no data at the end");

    let server = File::open(fx.e("sparse")).unwrap();
    assert_eq!(seek(server.as_raw_fd(), 0, libc::SEEK_HOLE), Ok(hole), "same answer as the export");
}

#[test]
fn sparse_file_beyond_4_gib() {
    // Goal: 64-bit offsets survive every layer (FUSE, protocol, server).
    // Method: write markers at 5 GiB and across the 4 GiB boundary of an empty file; check
    // the size, the markers, zeros in the hole, and that the export's file stays sparse.
    let fx = Fixture::mounted();
    let file = OpenOptions::new().create_new(true).read(true).write(true).open(fx.m("huge")).unwrap();
    let far = b"marker at five gibibytes";
    file.write_all_at(far, 5 * GIB).unwrap();
    let boundary = b"ACROSS4G";
    file.write_all_at(boundary, 4 * GIB - 4).unwrap();
    let size = 5 * GIB + far.len() as u64;
    assert_eq!(file.metadata().unwrap().len(), size);

    let mut buf = vec![0u8; far.len()];
    file.read_exact_at(&mut buf, 5 * GIB).unwrap();
    assert_eq!(buf, far);
    let mut buf = [0u8; 8];
    file.read_exact_at(&mut buf, 4 * GIB - 4).unwrap();
    assert_eq!(&buf, boundary);
    let mut hole = vec![0xffu8; 8192];
    file.read_exact_at(&mut hole, 4 * GIB + 4096).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "the hole reads as zeros");
    let mut low = [0xffu8; 8];
    file.read_exact_at(&mut low, 4).unwrap();
    assert_eq!(low, [0u8; 8], "nothing landed at the offset modulo 4 GiB");

    let server = File::open(fx.e("huge")).unwrap();
    let meta = server.metadata().unwrap();
    assert_eq!(meta.len(), size);
    assert!(meta.blocks() * 512 < 16 * MIB, "the export's file is not sparse: {} blocks", meta.blocks());
    let mut buf = vec![0u8; far.len()];
    server.read_exact_at(&mut buf, 5 * GIB).unwrap();
    assert_eq!(buf, far);
}

#[test]
fn copy_file_range_between_files() {
    // Goal: copy_file_range copies the right range to the right offset.
    // Method: copy 200 000 bytes from offset 4096 of a random file to offset 100 of another
    // file that has content; compare the target with the expected splice, through the mount
    // and in the export.
    let fx = Fixture::mounted();
    let source_bytes = Rng::new(3).bytes(300_000);
    fs::write(fx.m("src"), &source_bytes).unwrap();
    fs::write(fx.m("dst"), vec![b'-'; 1000]).unwrap();
    let source = File::open(fx.m("src")).unwrap();
    let target = OpenOptions::new().read(true).write(true).open(fx.m("dst")).unwrap();
    let (mut off_in, mut off_out): (i64, i64) = (4096, 100);
    let mut left = 200_000usize;
    while left > 0 {
        let n = unsafe { libc::copy_file_range(source.as_raw_fd(), &mut off_in, target.as_raw_fd(), &mut off_out, left, 0) };
        assert!(n > 0, "copy_file_range returned {n}, errno {}", last_errno());
        left -= n as usize;
    }
    assert_eq!((off_in, off_out), (4096 + 200_000, 100 + 200_000));
    let mut expected = vec![b'-'; 100];
    expected.extend_from_slice(&source_bytes[4096..4096 + 200_000]);
    drop(target);
    assert!(fs::read(fx.m("dst")).unwrap() == expected, "copied range through the mount");
    assert!(fs::read(fx.e("dst")).unwrap() == expected, "copied range in the export");
}

#[test]
fn statfs_reports_the_export_file_system() {
    // Goal: statfs on the mount describes the server's file system.
    // Method: statvfs the mount and the export; blocks must be nonzero and equal.
    let fx = Fixture::mounted();
    let mount = common::statvfs(&fx.mnt);
    let export = common::statvfs(&fx.export);
    assert!(mount.f_blocks > 0, "no blocks");
    assert!(mount.f_bsize > 0);
    assert_eq!(mount.f_blocks, export.f_blocks);
    assert_eq!(mount.f_frsize, export.f_frsize);
    assert_eq!(mount.f_namemax, 255);
    assert!(mount.f_files > 0);
}

#[test]
fn readdir_of_3000_entries_returns_each_once() {
    // Goal: a large directory lists every entry exactly once, and directory offsets are stable.
    // Method: create 3000 files through the mount; list with readdir (many kernel readdir
    // calls, several server batches); then seekdir back to offsets recorded by telldir and
    // check the listing resumes at the same entries.
    let fx = Fixture::mounted();
    fs::create_dir(fx.m("many")).unwrap();
    let count = 3000;
    for i in 0..count {
        File::create(fx.m(&format!("many/entry-{i:05}-{}", "n".repeat(i % 40)))).unwrap();
    }
    let listing = list_with_offsets(&fx.m("many"));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (name, _) in &listing {
        *seen.entry(name.clone()).or_default() += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "entries listed more than once: {repeated:?}");
    for i in 0..count {
        let name = format!("entry-{i:05}-{}", "n".repeat(i % 40));
        assert!(seen.contains_key(&name), "{name} missing from the listing");
    }
    assert_eq!(seen.len(), count + 2, "3000 entries plus . and ..");
    assert_eq!(fs::read_dir(fx.e("many")).unwrap().count(), count);

    // Resume from recorded offsets, each in a new directory stream: each offset must lead to
    // the entry that followed it.
    for probe in [1usize, 700, 1500, 2999, listing.len() - 1, listing.len()] {
        let dir = OpenDir::open(&fx.m("many"));
        dir.seek(listing[probe - 1].1);
        let next = dir.next().map(|(name, _)| name);
        let expected = listing.get(probe).map(|(name, _)| name.clone());
        assert_eq!(next, expected, "seekdir to the offset after entry {probe}");
    }
}

// Regression: an offset that is not among the entries the directory stream has cached must be
// fetched from the server at that offset, not treated as "continue after the cache".
#[test]
fn seekdir_within_one_stream_resumes_at_the_offset() {
    // Goal: seekdir on an open directory stream goes to the given offset, wherever the
    // stream's earlier reads were.
    // Method: create 3000 entries; record every telldir offset; then, in one stream, seekdir
    // forwards and backwards to recorded offsets and check the entry that follows each.
    let fx = Fixture::mounted();
    fs::create_dir(fx.m("many")).unwrap();
    for i in 0..3000 {
        File::create(fx.m(&format!("many/entry-{i:05}-{}", "n".repeat(i % 40)))).unwrap();
    }
    let listing = list_with_offsets(&fx.m("many"));
    assert_eq!(listing.len(), 3002);
    let dir = OpenDir::open(&fx.m("many"));
    for probe in [1usize, 700, 1500, 2999, 3001, 3002, 100, 2500, 1] {
        dir.seek(listing[probe - 1].1);
        let next = dir.next().map(|(name, _)| name);
        let expected = listing.get(probe).map(|(name, _)| name.clone());
        assert_eq!(next, expected, "seekdir to the offset after entry {probe}");
    }
}

#[test]
fn chmod_and_chown_are_visible_in_mount_and_export() {
    // Goal: mode and ownership changes are applied on the server.
    // Method: chmod and chown (to uid/gid 1000) a file and a directory through the mount;
    // compare stat through the mount and in the export.
    let fx = Fixture::mounted();
    fs::write(fx.m("owned"), b"o").unwrap();
    fs::create_dir(fx.m("dir")).unwrap();
    fs::set_permissions(fx.m("owned"), fs::Permissions::from_mode(0o604)).unwrap();
    fs::set_permissions(fx.m("dir"), fs::Permissions::from_mode(0o1750)).unwrap();
    for (name, mode) in [("owned", 0o604), ("dir", 0o1750)] {
        assert_eq!(fs::metadata(fx.m(name)).unwrap().mode() & 0o7777, mode, "{name} through the mount");
        assert_eq!(fs::metadata(fx.e(name)).unwrap().mode() & 0o7777, mode, "{name} in the export");
    }

    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipping chown");
        return;
    }
    std::os::unix::fs::chown(fx.m("owned"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::chown(fx.m("dir"), Some(1000), None).unwrap();
    let owned = fs::metadata(fx.m("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 1000));
    let owned = fs::metadata(fx.e("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 1000), "in the export");
    let dir = fs::metadata(fx.e("dir")).unwrap();
    assert_eq!((dir.uid(), dir.gid()), (1000, 0), "gid left alone");
    assert_eq!(fs::metadata(fx.m("dir")).unwrap().uid(), 1000);

    // A file created by uid 1000 in a directory it owns belongs to it on the server.
    let status = std::process::Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "touch"])
        .arg(fx.m("dir/by-user"))
        .status();
    if let Ok(status) = status {
        assert!(status.success(), "touch as uid 1000 failed: {status}");
        let made = fs::metadata(fx.e("dir/by-user")).unwrap();
        assert_eq!((made.uid(), made.gid()), (1000, 1000), "created with the caller's credentials");
    }
}

#[test]
fn a_write_without_cap_fsetid_clears_set_id_bits_as_locally() {
    // Goal: set-id bits go on a write by a user without CAP_FSETID (the kernel leaves that to
    // braid: FUSE_HANDLE_KILLPRIV_V2), exactly as on the exported file system, and stay on a
    // write by root.
    // Method: the same files made in the export's file system outside it (the reference) and
    // through the mount, where the client holds them (a long lease); uid 1000 writes to
    // each; root writes to one more; compare modes through the mount and in the export with
    // the reference.
    let fx = Fixture::mounted_queueing();
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipping");
        return;
    }
    let reference = fx.export.parent().unwrap().join("reference");
    fs::create_dir_all(&reference).unwrap();
    // set-uid; set-gid on a group-executable file; set-gid alone (which goes only for writers
    // outside the file's group)
    let modes = [("suid", 0o4777), ("sgid-exec", 0o2777), ("sgid", 0o2767)];
    // The mode right after the write (later, the write-back's answer would repair a wrong one).
    let mut seen = HashMap::new();
    for dir in [reference.as_path(), fx.mnt.as_path()] {
        for (name, mode) in modes {
            fs::write(dir.join(name), b"a").unwrap();
            fs::set_permissions(dir.join(name), fs::Permissions::from_mode(mode)).unwrap();
            write_as_user(&dir.join(name));
            seen.insert(dir.join(name), fs::metadata(dir.join(name)).unwrap().mode());
        }
        fs::write(dir.join("by-root"), b"a").unwrap();
        fs::set_permissions(dir.join("by-root"), fs::Permissions::from_mode(0o6777)).unwrap();
        OpenOptions::new().write(true).open(dir.join("by-root")).unwrap().write_all_at(b"b", 1).unwrap();
        seen.insert(dir.join("by-root"), fs::metadata(dir.join("by-root")).unwrap().mode());
    }
    for name in modes.iter().map(|(name, _)| *name).chain(["by-root"]) {
        let expected = seen[&reference.join(name)];
        assert_eq!(seen[&fx.m(name)], expected, "{name} through the mount");
        assert_eq!(fs::metadata(fx.e(name)).unwrap().mode(), expected, "{name} in the export");
        assert_eq!(fs::read(fx.m(name)).unwrap(), b"ab", "{name}: the write landed");
    }
    assert_eq!(seen[&fx.m("by-root")] & 0o7777, 0o6777, "root keeps the bits");
    assert_eq!(seen[&fx.m("suid")] & 0o7777, 0o777, "a user's write clears set-uid");
}

// ---- helpers ----------------------------------------------------------------------------

fn check(ret: libc::c_int) -> Result<(), i32> {
    if ret == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> Result<(), i32> {
    let (from, to) = (cstr(from), cstr(to));
    check(unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) })
}

fn mknod(path: &Path, mode: libc::mode_t, device: libc::dev_t) -> Result<(), i32> {
    let path = cstr(path);
    check(unsafe { libc::mknod(path.as_ptr(), mode, device) })
}

/// The process umask, read from /proc: setting and restoring it would race with other tests.
fn current_umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).expect("Umask line in /proc/self/status");
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
}

fn getxattr_size(path: &Path, name: &str) -> Result<usize, i32> {
    let (path, name) = (cstr(path), CString::new(name).unwrap());
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        Err(last_errno())
    } else {
        Ok(n as usize)
    }
}

fn listxattr(path: &Path, size: usize) -> Result<Vec<String>, i32> {
    let path = cstr(path);
    let mut buf = vec![0u8; size];
    let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(last_errno());
    }
    buf.truncate(n as usize);
    Ok(buf.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

fn removexattr(path: &Path, name: &str) -> Result<(), i32> {
    let (path, name) = (cstr(path), CString::new(name).unwrap());
    check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })
}

fn ts((sec, nsec): (i64, i64)) -> libc::timespec {
    libc::timespec { tv_sec: sec, tv_nsec: nsec }
}

fn omit() -> libc::timespec {
    libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }
}

fn now() -> libc::timespec {
    libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn utimensat(path: &Path, atime: libc::timespec, mtime: libc::timespec) -> Result<(), i32> {
    let path = cstr(path);
    let times = [atime, mtime];
    check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) })
}

fn seek(fd: libc::c_int, offset: u64, whence: libc::c_int) -> Result<u64, i32> {
    let at = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if at < 0 {
        Err(last_errno())
    } else {
        Ok(at as u64)
    }
}

/// A libc directory stream, for telldir and seekdir.
struct OpenDir(*mut libc::DIR);

impl OpenDir {
    fn open(path: &Path) -> Self {
        let path = cstr(path);
        let dir = unsafe { libc::opendir(path.as_ptr()) };
        assert!(!dir.is_null(), "opendir: errno {}", last_errno());
        Self(dir)
    }

    /// The next entry's name and the offset (telldir) just after it.
    fn next(&self) -> Option<(String, libc::c_long)> {
        let entry = unsafe { libc::readdir(self.0) };
        if entry.is_null() {
            return None;
        }
        let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) }.to_string_lossy().into_owned();
        Some((name, unsafe { libc::telldir(self.0) }))
    }

    fn seek(&self, offset: libc::c_long) {
        unsafe { libc::seekdir(self.0, offset) };
    }
}

impl Drop for OpenDir {
    fn drop(&mut self) {
        unsafe { libc::closedir(self.0) };
    }
}

/// Every entry of a directory (with . and ..) and the telldir offset after each.
fn list_with_offsets(path: &Path) -> Vec<(String, libc::c_long)> {
    let dir = OpenDir::open(path);
    std::iter::from_fn(|| dir.next()).collect()
}

#[test]
fn a_file_replaced_by_rename_never_fails_to_open() {
    // Goal: the atomic update of a file (write a temporary file, rename it over the target)
    // never makes a concurrent open of the target fail, as on a local file system: not with
    // ENOENT, and not with ESTALE when the open names the object the rename just replaced.
    // Creates queued: the writer runs at local speed.
    let fx = Fixture::mounted_queueing();
    let dir = fx.m("d");
    fs::create_dir(&dir).expect("mkdir");
    let target = dir.join("target");
    fs::write(&target, b"v0").expect("first version");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (target, stop) = (target.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match fs::read(&target) {
                    Ok(bytes) if bytes.first() == Some(&b'v') => reads += 1,
                    Ok(bytes) => failures.push(format!("garbled {bytes:?}")),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (reads, failures)
        })
    };
    for n in 0..2000u32 {
        let tmp = dir.join(format!("tmp{}", n % 4));
        fs::write(&tmp, format!("v{n}")).expect("write the new version");
        fs::rename(&tmp, &target).expect("rename over the target");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, failures) = reader.join().expect("reader");
    assert!(reads > 0, "the reader never read");
    assert!(
        failures.is_empty(),
        "{} of {} opens failed, e.g. {:?}",
        failures.len(),
        reads as usize + failures.len(),
        &failures[..failures.len().min(3)]
    );
}

#[test]
fn unsupported_ioctls_fail_cleanly_and_copies_fall_back() {
    // Goal: ioctls braid does not implement (file attribute flags, reflink clones) fail as on a
    // file system without them (lsattr reports it, `cp --reflink=auto` copies the bytes), and
    // quietly: fuser's default logged a warning for each, i.e. for every `cp`.
    let fx = Fixture::mounted_with(|_| {});
    fs::write(fx.m("f"), b"bytes").unwrap();
    let file = File::open(fx.m("f")).unwrap();
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long through the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    assert_eq!(r, -1);
    assert!(matches!(last_errno(), libc::ENOTTY | libc::EOPNOTSUPP), "errno {}", last_errno());
    let copy = std::process::Command::new("cp").args(["--reflink=auto"]).arg(fx.m("f")).arg(fx.m("g")).status().unwrap();
    assert!(copy.success());
    assert_eq!(fs::read(fx.m("g")).unwrap(), b"bytes");
    let logs = fx.logs_tail();
    assert!(!logs.contains("Not Implemented"), "a warning in the mount's log for every cp:\n{logs}");
}
