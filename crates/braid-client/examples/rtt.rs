//! Measures the client-server round trip without FUSE: `cargo run --release --example rtt -- HOST:PORT [N]`.
//! Prints the mean time of a GetAttr of the export root.
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let server = args.next().expect("usage: rtt HOST:PORT [N]");
    let n: u32 = args.next().map_or(20_000, |n| n.parse().expect("N is a number"));
    let config = braid_client::ClientConfig { server, client_name: "rtt".into(), retry_budget: None, tls: None, require: Vec::new() };
    let (client, info) = braid_client::Client::connect(config).expect("connect");
    let start = Instant::now();
    for _ in 0..n {
        client.getattr(&info.root.handle).expect("getattr");
    }
    println!("getattr round trip: {:.1} us", start.elapsed().as_secs_f64() * 1e6 / f64::from(n));
}
