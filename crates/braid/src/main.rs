//! `braid`: the command-line entry point. Parses arguments, sets up logging, and hands over to
//! the server or the FUSE client. Errors are reported here, once, with their context.
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "braid", version, about = "braid: a network file system with a coherent write-back cache")]
struct Cli {
    /// Log filter, as RUST_LOG (e.g. "info", "braid_server=debug").
    #[arg(long, global = true, default_value = "info", env = "BRAID_LOG")]
    log: String,
    /// Write logs to this file instead of standard error (a daemonized mount has no terminal).
    #[arg(long, global = true, value_name = "FILE")]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Export a local directory to braid clients.
    Serve(ServeArgs),
    /// Mount a braid export with FUSE.
    Mount(MountArgs),
    /// Create TLS credentials: a certificate authority, a server and a client certificate.
    Init(InitArgs),
    /// Unmount a braid mount (as `fusermount3 -u`).
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
}

#[derive(clap::Args)]
struct InitArgs {
    /// Where to write the credentials.
    #[arg(long, value_name = "DIR", env = "BRAID_TLS_DIR", default_value_os_t = default_tls_dir())]
    dir: PathBuf,
    /// Names and addresses clients use to reach the server (repeatable). Default: this host's
    /// name, localhost, 127.0.0.1 and ::1.
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Issue one more client certificate, NAME.pem and NAME.key, from the existing authority.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["server_names", "force"])]
    client: Option<String>,
    /// Replace existing credentials (every client then needs the new ones).
    #[arg(long)]
    force: bool,
}

/// TLS options shared by `serve` and `mount`.
#[derive(clap::Args)]
struct TlsArgs {
    /// Directory with the credentials made by `braid init`.
    #[arg(long, value_name = "DIR", env = "BRAID_TLS_DIR", default_value_os_t = default_tls_dir())]
    tls_dir: PathBuf,
    /// Plain TCP: no encryption and no authentication. Only for trusted networks and tests.
    #[arg(long)]
    insecure: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory to export. It may already hold files; they appear in the mount.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:7700.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Directory for the transaction log and the handle key. Must not be inside --data.
    /// Default: a sibling of the export named "<data>.braid-state".
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Refuse every change: clients get EROFS.
    #[arg(long)]
    read_only: bool,
    /// Size limit of the export, e.g. 500M or 20G: writes beyond it fail with ENOSPC, and df on
    /// the mount shows this size.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    max_size: Option<u64>,
    /// Trust root on clients: without this, changes made by remote root are made as nobody.
    #[arg(long)]
    no_root_squash: bool,
    /// Seconds a client may cache an object without asking again (its lease). Also how long a
    /// client that vanished without unmounting can delay others' changes and keep its locks.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = parse_lease)]
    lease: f64,
    /// Seconds after which changes nobody asked to make durable (no fsync) are made durable
    /// anyway: the most work a crash of the server's machine can undo.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = parse_commit_interval)]
    commit_interval: f64,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(clap::Args)]
struct MountArgs {
    /// Server address, HOST:PORT.
    server: String,
    /// Where to mount.
    mountpoint: PathBuf,
    /// Stay in the foreground instead of daemonizing once the mount is up.
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Seconds a request waits for an unreachable server before failing with ETIMEDOUT;
    /// 0 waits for ever (like NFS "hard").
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    timeout: u64,
    /// Kernel request threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Kernel readahead in KiB for sequential reads (FUSE's own default is 128).
    #[arg(long, value_name = "KIB", default_value_t = 4096)]
    readahead_kb: u32,
    /// Refuse to mount unless the server uses this algorithm (repeatable): a checksum such as
    /// crc32c, the cipher tls13, or the authentication x509.
    #[arg(long, value_name = "ALGORITHM")]
    require: Vec<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Internal: set by the parent of a daemonized mount; print "ready" when mounted.
    #[arg(long, hide = true)]
    notify_ready: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log, cli.log_file.as_deref()) {
        eprintln!("braid: {e:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Commands::Serve(args) => serve(args),
        Commands::Mount(args) if args.foreground || args.notify_ready => mount(args, cli.log_file.as_deref()),
        Commands::Mount(args) => daemonize_mount(&args),
        Commands::Init(args) => init(&args),
        Commands::Umount { mountpoint } => umount(&mountpoint),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("braid: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, file: Option<&Path>) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).with_context(|| format!("bad --log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            builder.with_ansi(false).with_writer(std::sync::Mutex::new(file)).init();
        }
        // Colours only on a terminal: a log redirected to a file or a journal stays plain text.
        None => builder.with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    if !args.data.is_dir() {
        bail!("--data {}: not a directory", args.data.display());
    }
    let state = args.state.unwrap_or_else(|| default_state_dir(&args.data));
    let tls = match args.tls.insecure {
        true => {
            tracing::warn!("--insecure: serving plain TCP; anyone who reaches the port can read and change the export");
            None
        }
        false => Some(server_tls(&args.tls.tls_dir)?),
    };
    let config = braid_server::ServerConfig {
        data_dir: args.data.clone(),
        state_dir: state.clone(),
        read_only: args.read_only,
        max_bytes: args.max_size,
        root_squash: !args.no_root_squash,
        tls,
        lease: Duration::from_secs_f64(args.lease),
        commit_interval: Duration::from_secs_f64(args.commit_interval),
    };
    let server = braid_server::Server::open(&config).with_context(|| format!("cannot start serving {}", args.data.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("braid-server").build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
        // The bound address, not the asked one: `--listen HOST:0` takes a free port, named here.
        let listen = listener.local_addr().context("the listening socket has no address")?;
        tracing::info!(data = %args.data.display(), state = %state.display(), %listen, read_only = args.read_only, "serving");
        tokio::select! {
            served = server.serve(listener) => served.context("accepting connections failed"),
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; stopping");
                Ok(())
            }
        }
    })
}

fn init(args: &InitArgs) -> Result<()> {
    let issued = match &args.client {
        Some(name) => braid_tls::issue_client(&args.dir, name),
        None => {
            let mut names = args.server_names.clone();
            if names.is_empty() {
                names = vec![hostname(), "localhost".into(), "127.0.0.1".into(), "::1".into()];
            }
            braid_tls::init(&args.dir, &names, &format!("braid client {}", hostname()), args.force)
        }
    }
    .with_context(|| format!("cannot create credentials in {}", args.dir.display()))?;
    for file in &issued.files {
        println!("wrote {}", file.display());
    }
    println!("clients need ca.pem, client.pem and client.key in their --tls-dir (default {})", default_tls_dir().display());
    Ok(())
}

fn server_tls(dir: &Path) -> Result<std::sync::Arc<braid_tls::ServerConfig>> {
    if !braid_tls::has_server_credentials(dir) {
        bail!(
            "no TLS credentials in {0}: create them with `braid init --dir {0}`, or pass --insecure to serve plain TCP \
             without authentication",
            dir.display()
        );
    }
    braid_tls::server_config(dir).with_context(|| format!("cannot load the server credentials in {}", dir.display()))
}

fn client_tls(dir: &Path) -> Result<std::sync::Arc<braid_tls::ClientConfig>> {
    if !braid_tls::has_client_credentials(dir) {
        bail!(
            "no TLS credentials in {0}: copy ca.pem, client.pem and client.key made by `braid init` on the server into {0} \
             (or pass --tls-dir), or pass --insecure for plain TCP",
            dir.display()
        );
    }
    braid_tls::client_config(dir).with_context(|| format!("cannot load the client credentials in {}", dir.display()))
}

/// `/etc/braid` for root, `~/.config/braid` for anyone else.
fn default_tls_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/etc/braid");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".config/braid")
}

fn parse_lease(text: &str) -> std::result::Result<f64, String> {
    parse_seconds(text, 0.1..=3600.0, "a lease lasts")
}

fn parse_commit_interval(text: &str) -> std::result::Result<f64, String> {
    parse_seconds(text, 0.01..=3600.0, "the commit interval is")
}

fn parse_seconds(text: &str, range: std::ops::RangeInclusive<f64>, what: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if range.contains(&seconds) => Ok(seconds),
        Ok(_) => Err(format!("{what} from {} to {} seconds", range.start(), range.end())),
        Err(e) => Err(format!("not a number of seconds: {e}")),
    }
}

/// Parses a size such as 1048576, 512K, 20M, 3G or 1T (powers of 1024).
fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        other => return Err(format!("unknown unit {other:?} in {text:?}: use K, M, G or T")),
    };
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size"))?;
    value.checked_shl(shift).filter(|v| v >> shift == value).ok_or_else(|| format!("{text:?} is too large"))
}

fn default_state_dir(data: &Path) -> PathBuf {
    let data = std::fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
    let name = data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into());
    data.with_file_name(format!("{name}.braid-state"))
}

fn mount(args: MountArgs, log_file: Option<&Path>) -> Result<()> {
    if !args.mountpoint.is_dir() {
        bail!("mount point {}: not a directory", args.mountpoint.display());
    }
    let config = braid_client::ClientConfig {
        server: args.server.clone(),
        client_name: format!("{}:{}", hostname(), std::process::id()),
        retry_budget: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
        tls: if args.tls.insecure { None } else { Some(client_tls(&args.tls.tls_dir)?) },
        require: args.require.clone(),
    };
    let (client, info) =
        braid_client::Client::connect(config).with_context(|| format!("cannot mount {} on {}", args.server, args.mountpoint.display()))?;
    let options =
        braid_fuse::MountOptions { threads: args.threads, fs_name: format!("braid:{}", args.server), readahead_kb: args.readahead_kb };
    let fs = braid_fuse::BraidFs::new(client, &info);
    let session = braid_fuse::mount(fs, &args.mountpoint, &options)
        .with_context(|| format!("cannot mount on {} (is fuse3 installed and /dev/fuse present?)", args.mountpoint.display()))?;
    tracing::info!(server = %args.server, mountpoint = %args.mountpoint.display(), "mounted");
    if args.notify_ready {
        // The parent waits for this line, then exits; our stdout is its pipe.
        println!("ready");
        std::io::stdout().flush()?;
        detach_from_terminal(log_file)?;
    }
    session.run().context("FUSE session failed")?;
    tracing::info!(mountpoint = %args.mountpoint.display(), "unmounted");
    Ok(())
}

/// Runs the mount in a detached child and returns once the child says the mount is up, or
/// fails with the child's error, as sshfs does.
fn daemonize_mount(_args: &MountArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the braid executable")?;
    let mut command = Process::new(exe);
    command.args(std::env::args_os().skip(1)).arg("--notify-ready").stdin(Stdio::null()).stdout(Stdio::piped());
    // Its own process group: a Ctrl-C in the shell that ran `braid mount` must not kill it.
    // Errors before "ready" still reach the user through the inherited stderr.
    command.process_group(0);
    let mut child = command.spawn().context("cannot start the mount daemon")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).context("reading the mount daemon's status")?;
    if line.trim() == "ready" {
        return Ok(());
    }
    let status = child.wait()?;
    bail!("mount failed ({status})");
}

use std::os::unix::process::CommandExt;

/// After "ready" the parent has exited: stdout is a closed pipe and stderr a terminal (or a
/// pipe) that may go away or keep a reader waiting for ever. Point stdout at /dev/null and
/// stderr at the log file (so that a panic message is kept), or at /dev/null without one.
fn detach_from_terminal(log_file: Option<&Path>) -> Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null").context("cannot open /dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), 1).context("cannot redirect stdout")?;
    let stderr = match log_file {
        Some(path) => std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?,
        None => null,
    };
    nix::unistd::dup2(stderr.as_raw_fd(), 2).context("cannot redirect stderr")?;
    Ok(())
}

fn umount(mountpoint: &Path) -> Result<()> {
    let status =
        Process::new("fusermount3").arg("-u").arg(mountpoint).status().context("cannot run fusermount3 (install the fuse3 package)")?;
    if !status.success() {
        bail!("fusermount3 -u {} failed ({status})", mountpoint.display());
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("20M"), Ok(20 << 20));
        assert_eq!(parse_size("3GiB"), Ok(3 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
